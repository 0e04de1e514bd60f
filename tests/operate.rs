//! What operators run and watch: the health probes, SIGHUP reloads, and the files of deploy/
//! checked against a daemon that did real work (every series the dashboard and the alert rules
//! query exists with the type the query needs) and by the tools of each ecosystem (promtool,
//! systemd-analyze, hadolint, kubernetes-validate, the Prometheus Operator's CRD schema).
//!
//! The external tools are installed by `.ci/run`, which sets `DELTADOC_OPS_TOOLS=required`; a
//! machine without them skips those checks with a message instead.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::sandbox::{Daemon, Sandbox, metric, wait_for};
use serde_json::Value;

fn corpus_file(rel: &str) -> Vec<u8> {
    std::fs::read(common::corpus_path().join(rel)).unwrap()
}

fn readyz(d: &Daemon) -> (u16, Value) {
    let (code, body) = d.get("/readyz");
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz body is not JSON ({e}): {body}")))
}

#[test]
fn readyz_turns_503_naming_a_vanished_inbox_and_200_when_it_returns() {
    let sb = Sandbox::new("", 4096);
    let d = sb.serve();
    assert_eq!(d.get("/livez").0, 200);
    wait_for("ready", Duration::from_secs(120), || (readyz(&d).0 == 200).then_some(()));
    let (_, r) = readyz(&d);
    let checks: BTreeSet<&str> = r["checks"].as_array().unwrap().iter().map(|c| c["check"].as_str().unwrap()).collect();
    assert_eq!(checks, BTreeSet::from(["inbox", "ledger", "model", "storage", "worker"]), "{r}");

    // An unmounted share looks like this: the folder is gone.
    std::fs::rename(sb.path("inbox"), sb.path("inbox-away")).unwrap();
    let (code, r) = readyz(&d);
    assert_eq!(code, 503, "{r}");
    assert_eq!(r["ready"], false);
    let failed = &r["checks"][0];
    assert_eq!((failed["check"].as_str(), failed["ok"].as_bool()), (Some("inbox"), Some(false)), "failed check first: {r}");
    assert!(failed["detail"].as_str().unwrap().contains(&sb.path("inbox").display().to_string()), "names the folder: {r}");
    assert_eq!(d.get("/livez").0, 200, "alive while not ready");
    assert_eq!(metric(&d.scrape(), "deltadoc_ready", &[]), Some(0.0));

    std::fs::rename(sb.path("inbox-away"), sb.path("inbox")).unwrap();
    assert_eq!(readyz(&d).0, 200);
    assert_eq!(metric(&d.scrape(), "deltadoc_ready", &[]), Some(1.0));
    d.stop();
}

/// A Python that has fusepy, on a machine where FUSE mounts work (`.ci/run` installs libfuse2
/// and fusepy into its tools folder); `None` skips the check unless `DELTADOC_OPS_TOOLS` is
/// `required`.
fn fuse_python() -> Option<PathBuf> {
    let candidates = [common::root().join(".ci/.tools/venv/bin/python"), PathBuf::from("python3")];
    let works = |py: &PathBuf| {
        Path::new("/dev/fuse").exists() && Command::new(py).args(["-c", "import fuse"]).output().is_ok_and(|o| o.status.success())
    };
    let found = candidates.into_iter().find(works);
    if found.is_none() && std::env::var("DELTADOC_OPS_TOOLS").as_deref() == Ok("required") {
        panic!("fusepy with libfuse2 and /dev/fuse are required (DELTADOC_OPS_TOOLS=required)");
    }
    found
}

/// A FUSE mount whose listings hang (tests/data/hung_fs.py), torn down on drop.
struct HungMount {
    server: std::process::Child,
    path: PathBuf,
}

impl HungMount {
    fn new(python: &Path, path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let server = Command::new(python)
            .arg(common::root().join("tests/data/hung_fs.py"))
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let m = Self { server, path };
        let mounted = || std::fs::read_to_string("/proc/mounts").unwrap().contains(&format!(" {} fuse", m.path.display()));
        wait_for("the hung mount", Duration::from_secs(30), || mounted().then_some(()));
        m
    }
}

impl Drop for HungMount {
    fn drop(&mut self) {
        // The server's death fails every request still waiting on the mount.
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A hung network mount must not make Kubernetes restart a daemon in the middle of a prefill:
/// `/livez` answers from memory, `/readyz` and `/metrics` answer within their deadline and name
/// the inbox that does not.
#[test]
fn the_probes_answer_while_an_inbox_hangs() {
    let Some(python) = fuse_python() else { return skipped("the probes against a hung mount (fusepy, libfuse2)") };
    let sb = Sandbox::new("", 4096);
    let mount = HungMount::new(&python, sb.path("hung"));
    let stages = "stages: [{name: s, kind: summarize, max_new_tokens: 4}]\n";
    sb.write("pipelines/p.yaml", &format!("name: p\ninboxes: [{{path: {:?}}}]\noutput: out/p\n{stages}", mount.path));
    let d = sb.serve();
    let fast = |path: &str, within: Duration| {
        let t = std::time::Instant::now();
        let (code, body) = d.get(path);
        assert!(t.elapsed() < within, "{path} took {:?}", t.elapsed());
        (code, body)
    };
    for _ in 0..5 {
        assert_eq!(fast("/livez", Duration::from_millis(500)).0, 200);
    }
    let deadline = Duration::from_secs(5);
    for attempt in ["no answer within", "no answer for"] {
        let (code, body) = fast("/readyz", deadline);
        assert_eq!(code, 503, "{body}");
        let r: Value = serde_json::from_str(&body).unwrap();
        let inbox = r["checks"].as_array().unwrap().iter().find(|c| c["check"] == "inbox").unwrap().clone();
        let detail = inbox["detail"].as_str().unwrap();
        assert!(inbox["ok"] == false && detail.contains(&mount.path.display().to_string()), "{r}");
        // A listing still hanging from the last probe is not started again.
        assert!(detail.contains(attempt), "{attempt}: {r}");
    }
    let (code, body) = fast("/metrics", deadline);
    assert_eq!(code, 200);
    assert_eq!(metric(&body, "deltadoc_ready", &[]), Some(0.0));
    assert_eq!(fast("/livez", Duration::from_millis(500)).0, 200, "still alive");
    drop(mount);
    d.signal(libc::SIGKILL);
}

#[test]
fn sighup_reloads_pipelines_between_documents_and_keeps_the_old_ones_on_a_bad_file() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = Sandbox::new("", 4096);
    let d = sb.serve();
    let nda = corpus_file("contracts/commonpaper__Mutual-NDA.md");
    // Work in flight while the reload is requested: it must finish, not be dropped.
    std::fs::write(sb.path("inbox/a.md"), &nda).unwrap();
    std::fs::write(sb.path("inbox/b.md"), [&nda[..], b"\n\nAddendum."].concat()).unwrap();
    sb.write(
        "pipelines/q.yaml",
        &format!(
            "name: q\ninboxes: [{{path: inbox-q}}]\noutput: out/q\nquarantine: quarantine/q\n{}",
            common::sandbox::QUICK_STAGES
        ),
    );
    std::fs::create_dir_all(sb.path("inbox-q")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded: pipelines p, q", Duration::from_secs(120));
    std::fs::write(sb.path("inbox-q/c.md"), corpus_file("contracts/commonpaper__Mutual-NDA.md")).unwrap();
    wait_for("results of both pipelines", Duration::from_secs(180), || {
        let p = sb.results().len();
        let q = common::sandbox::json_files(&sb.path("out/q")).len();
        (p == 2 && q == 1).then_some(())
    });

    // A broken pipeline file: the reload is refused with the reason, the running set stays.
    sb.write("pipelines/broken.yaml", "name: broken\ninboxes: []\noutput: out/x\nstages: []\n");
    d.signal(libc::SIGHUP);
    let refused = d.wait_log("reload refused", Duration::from_secs(60));
    assert!(refused.contains("broken.yaml"), "names the file: {refused}");
    std::fs::write(sb.path("inbox-q/d.md"), [&nda[..], b"\n\nSecond addendum."].concat()).unwrap();
    wait_for("q still runs", Duration::from_secs(180), || {
        (common::sandbox::json_files(&sb.path("out/q")).len() == 2).then_some(())
    });
    let m = d.scrape();
    assert_eq!(metric(&m, "deltadoc_config_reloads_total", &["outcome=\"ok\""]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "deltadoc_config_reloads_total", &["outcome=\"failed\""]), Some(1.0));
    assert_eq!(metric(&m, "deltadoc_documents_total", &["pipeline=\"p\"", "outcome=\"ok\""]), Some(2.0));
    assert_eq!(metric(&m, "deltadoc_documents_total", &["pipeline=\"p\"", "outcome=\"failed\""]), Some(0.0));
    d.stop();
}

/// Metric families of an exposition: name → (type, label names seen on its samples).
fn families(exposition: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for l in exposition.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            out.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
        } else if !l.starts_with('#') && !l.is_empty() {
            let series = l.rsplit_once(' ').unwrap().0;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| out.get(*b).is_some_and(|f| f.0 == "histogram")))
                .unwrap_or(name);
            let f = out.get_mut(family).unwrap_or_else(|| panic!("sample before its TYPE: {l}"));
            f.1.extend(labels.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, _)| k.to_string()));
        }
    }
    out
}

/// Every `deltadoc_*` selector of a PromQL expression: (metric name, label names matched, whether
/// a range `[..]` follows).
fn selectors(expr: &str) -> Vec<(String, Vec<String>, bool)> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("deltadoc_") {
        let start = i + off;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        let name = expr[start..end].to_string();
        let mut labels = Vec::new();
        let mut j = end;
        if b.get(j) == Some(&b'{') {
            let close = j + expr[j..].find('}').unwrap();
            for m in expr[j + 1..close].split(',') {
                let k: String = m.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !k.is_empty() {
                    labels.push(k);
                }
            }
            j = close + 1;
        }
        out.push((name, labels, b.get(j) == Some(&b'[')));
        i = end;
    }
    out
}

/// Checks one query against the scrape; returns the problems found.
fn check_query(expr: &str, fams: &BTreeMap<String, (String, BTreeSet<String>)>, templating: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, labels, ranged) in selectors(expr) {
        let (family, kind, part) = match fams.get(&name) {
            Some((kind, _)) => (name.clone(), kind.clone(), None),
            None => match ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| fams.get(*b).is_some_and(|f| f.0 == "histogram")).map(|b| (b, *s)))
            {
                Some((base, suffix)) => (base.to_string(), "histogram".to_string(), Some(suffix)),
                None => {
                    problems.push(format!("{name}: not exported (query: {expr})"));
                    continue;
                }
            },
        };
        let wanted = match (part, ranged) {
            _ if templating => None,
            (Some(_), _) => None,
            (None, true) => Some("counter"),
            (None, false) => Some("gauge"),
        };
        if let Some(w) = wanted
            && w != kind
        {
            problems.push(format!("{name}: queried as a {w} but exported as a {kind} (query: {expr})"));
        }
        let known = &fams[&family].1;
        for l in labels.iter().filter(|l| !matches!(l.as_str(), "job" | "instance")) {
            if !(known.contains(l) || (part == Some("_bucket") && l == "le")) {
                problems.push(format!("{name}: no label {l:?} (has {known:?}; query: {expr})"));
            }
        }
    }
    problems
}

/// Every string under a key named `key`, anywhere in `v`.
fn strings_under(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_under(x, key, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings_under(x, key, out)),
        _ => {}
    }
}

fn deploy(rel: &str) -> PathBuf {
    common::root().join("deploy").join(rel)
}

fn dashboard() -> Value {
    serde_json::from_slice(&std::fs::read(deploy("grafana/deltadoc.json")).unwrap()).unwrap()
}

fn alert_exprs() -> Vec<(String, String)> {
    let rules: Value = serde_saphyr::from_str(&std::fs::read_to_string(deploy("prometheus/alerts.yaml")).unwrap()).unwrap();
    let mut out = Vec::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            out.push((r["alert"].as_str().unwrap().to_string(), r["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[test]
fn every_series_the_dashboard_and_alerts_query_exists_with_the_queried_type() {
    let Some(_corpus) = common::corpus() else { return };
    let nightly = "schedule: {cron: \"*/3 * * * * *\", timezone: UTC, window: 2s}\n";
    let sb = Sandbox::new(nightly, 4096);
    let d = sb.serve();
    // A good document, a broken one (failures by reason, quarantine) and a scanned page (OCR
    // routing), through a scheduled pipeline, so that runs start and end.
    std::fs::write(sb.path("inbox/nda.md"), corpus_file("contracts/commonpaper__Mutual-NDA.md")).unwrap();
    std::fs::write(sb.path("inbox/broken.pdf"), corpus_file("malformed/ocrmypdf__invalid.pdf")).unwrap();
    wait_for("a scheduled run with both documents", Duration::from_secs(240), || {
        let m = d.scrape();
        let finished = metric(&m, "deltadoc_documents_total", &["outcome=\"ok\""]).unwrap_or(0.0)
            + metric(&m, "deltadoc_documents_total", &["outcome=\"quarantined\""]).unwrap_or(0.0);
        let runs = metric(&m, "deltadoc_schedule_run_documents_count", &[]).unwrap_or(0.0);
        (finished == 2.0 && runs >= 1.0).then_some(())
    });
    let scrape = d.scrape();
    let fams = families(&scrape);

    let mut problems = Vec::new();
    let mut queried = BTreeSet::new();
    let dash = dashboard();
    let mut exprs = Vec::new();
    strings_under(&dash["panels"], "expr", &mut exprs);
    assert!(exprs.len() >= 30, "the dashboard has {} queries", exprs.len());
    for e in &exprs {
        problems.extend(check_query(e, &fams, false));
        queried.extend(selectors(e).into_iter().map(|s| s.0));
    }
    let mut var_queries = Vec::new();
    strings_under(&dash["templating"], "definition", &mut var_queries);
    for q in &var_queries {
        problems.extend(check_query(q, &fams, true));
    }
    for (alert, e) in alert_exprs() {
        problems.extend(check_query(&e, &fams, false).into_iter().map(|p| format!("alert {alert}: {p}")));
        queried.extend(selectors(&e).into_iter().map(|s| s.0));
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
    // The other way round: every family the daemon exports is on the dashboard or in an alert.
    let unused: Vec<&String> = fams
        .keys()
        .filter(|f| !queried.iter().any(|q| q == *f || q.strip_prefix(f.as_str()).is_some_and(|s| s.starts_with('_'))))
        .collect();
    assert!(unused.is_empty(), "exported but on no panel and in no alert: {unused:?}");

    match tool("promtool") {
        Some(promtool) => {
            let f = sb.path("scrape.prom");
            std::fs::write(&f, &scrape).unwrap();
            let out =
                Command::new(&promtool).args(["check", "metrics"]).stdin(std::fs::File::open(&f).unwrap()).output().unwrap();
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
        }
        None => skipped("promtool check metrics"),
    }
    d.stop();
}

#[test]
fn the_dashboard_is_templated_and_has_no_hard_coded_datasource() {
    let dash = dashboard();
    let vars: BTreeSet<&str> =
        dash["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    for v in ["datasource", "job", "instance", "pipeline"] {
        assert!(vars.contains(v), "template variable {v} missing: {vars:?}");
    }
    fn datasources<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "datasource" {
                        out.push(x);
                    } else {
                        datasources(x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| datasources(x, out)),
            _ => {}
        }
    }
    let mut ds = Vec::new();
    datasources(&dash, &mut ds);
    for d in ds {
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(
            uid == "${datasource}" || uid == "-- Grafana --",
            "datasource must be the ${{datasource}} variable, not a fixed one: {d}"
        );
        assert!(d.get("id").is_none() && !d.is_number(), "datasource by numeric id: {d}");
    }
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
        assert!(p["gridPos"]["w"].as_u64().unwrap() > 0);
        titles.push(p["title"].as_str().unwrap());
        if p["type"] != "row" {
            assert!(!p["targets"].as_array().unwrap().is_empty(), "panel {} has no query", p["title"]);
        }
    }
    for row in ["Overview", "Backlog", "Latency", "Tokens", "Failures", "Model and runtime", "Schedules", "Watcher"] {
        assert!(titles.contains(&row), "row {row} missing: {titles:?}");
    }
}

/// A tool of the operations checks: on PATH or in the tools folder `.ci/run` fills. `None` (the
/// check is skipped) only when `DELTADOC_OPS_TOOLS` is not `required`.
fn tool(name: &str) -> Option<PathBuf> {
    let local = common::root().join(".ci/.tools/venv/bin").join(name);
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .chain([local])
        .find(|p| p.is_file());
    if found.is_none() && std::env::var("DELTADOC_OPS_TOOLS").as_deref() == Ok("required") {
        panic!("{name} is required (DELTADOC_OPS_TOOLS=required) but neither on PATH nor in .ci/.tools");
    }
    found
}

fn skipped(what: &str) {
    eprintln!("SKIPPED {what}: tool not installed (.ci/run installs it; see README: Testing)");
}

/// Runs a tool and requires success with nothing on stderr (several of them only warn).
fn run_clean(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stderr.trim().is_empty(), "{cmd:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout.into_owned()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else { return skipped("promtool check/test rules") };
    let dir = deploy("prometheus");
    let out = run_clean(Command::new(&promtool).current_dir(&dir).args(["check", "rules", "alerts.yaml"]));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_clean(Command::new(&promtool).current_dir(&dir).args(["test", "rules", "alerts.test.yaml"]));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = tool("systemd-analyze") else { return skipped("systemd-analyze verify") };
    // verify insists that ExecStart exists: point it at the binary under test.
    let unit = std::fs::read_to_string(deploy("systemd/deltadoc.service")).unwrap();
    for needed in ["NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=", "ExecReload=", "MemoryMax=", "User="] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("deltadoc.service");
    std::fs::write(&f, unit.replace("/opt/deltadoc/bin/deltadoc", env!("CARGO_BIN_EXE_deltadoc"))).unwrap();
    run_clean(Command::new(analyze).arg("verify").arg(&f));
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let Some(hadolint) = tool("hadolint") else { return skipped("hadolint") };
    run_clean(Command::new(hadolint).arg(deploy("docker/Dockerfile")));
}

fn k8s_docs() -> Vec<(String, Value)> {
    let dir = deploy("k8s");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files.iter().filter(|f| f.extension().is_some_and(|x| x == "yaml")) {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in text.split("\n---\n") {
            let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out
}

#[test]
fn kubernetes_manifests_validate_and_reference_each_other() {
    let docs = k8s_docs();
    let kind = |k: &str| docs.iter().find(|(_, v)| v["kind"] == k).map(|(_, v)| v).unwrap_or_else(|| panic!("no {k}"));
    let (sts, svc, sm) = (kind("StatefulSet"), kind("Service"), kind("ServiceMonitor"));
    let pod = &sts["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    // Service selects the pods, the ServiceMonitor selects the Service and scrapes a port it has,
    // the probes hit /livez and /readyz on the container's metrics port.
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "Service selector {k} does not match the pods");
    }
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "ServiceMonitor selector {k} does not match the Service");
    }
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(svc["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == port));
    assert!(c["ports"].as_array().unwrap().iter().any(|p| p["name"] == port && p["containerPort"] == 9464));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    // The image listens where the probes look.
    let dockerfile = std::fs::read_to_string(deploy("docker/Dockerfile")).unwrap();
    assert!(dockerfile.contains("DELTADOC_METRICS_LISTEN=0.0.0.0:9464"));
    // Every mounted volume is declared; every claim exists.
    let volumes: BTreeSet<&str> =
        pod["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    let templates: BTreeSet<&str> =
        sts["spec"]["volumeClaimTemplates"].as_array().unwrap().iter().map(|v| v["metadata"]["name"].as_str().unwrap()).collect();
    for m in c["volumeMounts"].as_array().unwrap() {
        let n = m["name"].as_str().unwrap();
        assert!(volumes.contains(n) || templates.contains(n), "volume {n} is mounted but not declared");
    }
    let claims: BTreeSet<&str> = docs
        .iter()
        .filter(|(_, v)| v["kind"] == "PersistentVolumeClaim")
        .map(|(_, v)| v["metadata"]["name"].as_str().unwrap())
        .collect();
    for v in pod["spec"]["volumes"].as_array().unwrap() {
        if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            assert!(claims.contains(claim), "claim {claim} is not defined");
        }
    }
    // Requests = limits (the nightly batch is not the first thing evicted), and they hold what
    // the daemon may plan for the model plus the extraction child's cap.
    let res = &c["resources"];
    assert_eq!(res["requests"], res["limits"]);
    let env: BTreeMap<&str, &str> =
        c["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap())).collect();
    let budget: deltadoc::config::ByteSize = env["DELTADOC_MEMORY_BUDGET"].parse().unwrap();
    let defaults: deltadoc::config::DaemonConfig =
        deltadoc::config::parse_yaml(deltadoc::config::EMBEDDED_DAEMON_CONFIG, "embedded").unwrap();
    let limit: deltadoc::config::ByteSize = res["limits"]["memory"].as_str().unwrap().parse().unwrap();
    let needed = budget.0 + defaults.limits.extract_memory.0;
    assert!(limit.0 >= needed, "memory limit {} < memory_budget + extract_memory = {needed}", limit.0);
    // The pipelines ConfigMap holds pipelines deltadoc accepts.
    let cm = kind("ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    for (name, text) in cm["data"].as_object().unwrap() {
        let f = dir.path().join("pipelines").join(name);
        std::fs::write(&f, text.as_str().unwrap()).unwrap();
        deltadoc::config::load_pipeline(&f, Some(Path::new("/srv/deltadoc")))
            .unwrap_or_else(|e| panic!("ConfigMap {name}: {e:#}"));
    }

    match tool("kubernetes-validate") {
        Some(kv) => {
            let core: Vec<PathBuf> = ["configmap.yaml", "pvc.yaml", "service.yaml", "statefulset.yaml"]
                .iter()
                .map(|f| deploy("k8s").join(f))
                .collect();
            let out = run_clean(Command::new(kv).arg("--strict").args(&core));
            assert_eq!(out.matches("passed").count(), 5, "{out}");
        }
        None => skipped("kubernetes-validate"),
    }
    let crd_validator = common::root().join(".ci/k8s/node_modules");
    match (tool("node"), crd_validator.is_dir()) {
        (Some(node), true) => {
            let out = run_clean(
                Command::new(node).arg(common::root().join(".ci/k8s/validate-crds.mjs")).arg(deploy("k8s/servicemonitor.yaml")),
            );
            assert!(out.contains("ServiceMonitor/deltadoc valid"), "{out}");
        }
        _ if std::env::var("DELTADOC_OPS_TOOLS").as_deref() == Ok("required") => {
            panic!("the ServiceMonitor schema check needs node and `npm ci` in .ci/k8s")
        }
        _ => skipped("ServiceMonitor CRD schema"),
    }
}

/// The host and port of a ledger URL (`postgres://user@host:port/db`).
fn ledger_host(url: &str) -> (String, u16) {
    let rest = url.strip_prefix("postgres://").unwrap_or_else(|| panic!("{url}: not a postgres:// URL"));
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "5432"));
    (host.to_string(), port.parse().unwrap())
}

/// A fleet (docs/fleet.md) as deployed: every daemon reaches the ledger's service with the password
/// from the ledger's own secret, names itself uniquely and mounts the shared documents; the
/// Kubernetes manifests pass kubernetes-validate, the compose file passes Docker Compose's own
/// `config` check (the Compose specification's schema and interpolation) and its references resolve.
#[test]
fn the_fleet_manifests_reference_each_other_and_validate() {
    let fleet = deploy("k8s/fleet");
    let kustomization: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(fleet.join("kustomization.yaml")).unwrap()).unwrap();
    for r in kustomization["resources"].as_array().unwrap() {
        assert!(fleet.join(r.as_str().unwrap()).exists(), "kustomization resource {r} is missing");
    }
    let mut docs = Vec::new();
    for f in ["deployment.yaml", "postgres.yaml"] {
        for doc in std::fs::read_to_string(fleet.join(f)).unwrap().split("\n---\n") {
            docs.push(serde_saphyr::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{f}: {e}")));
        }
    }
    let kind = |k: &str| docs.iter().find(|v| v["kind"] == k).unwrap_or_else(|| panic!("no {k}"));
    let (daemons, db, db_svc) = (kind("Deployment"), kind("StatefulSet"), kind("Service"));
    let pod = &daemons["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    let env = |c: &Value, name: &str| c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
    let url = env(c, "DELTADOC_LEDGER").unwrap()["value"].as_str().unwrap().to_string();
    let (host, port) = ledger_host(&url);
    assert_eq!(db_svc["metadata"]["name"].as_str(), Some(host.as_str()), "the ledger URL names the PostgreSQL Service");
    assert_eq!(db_svc["spec"]["ports"][0]["port"].as_u64(), Some(port as u64));
    assert_eq!(env(c, "DELTADOC_WORKER_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    // The pod volume that holds `file` in `container`.
    let volume_of = |spec: &Value, container: &Value, file: &str| -> Value {
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{file} is on no mounted volume"));
        spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap().clone()
    };
    // Checkpoints and journals on the volume every pod mounts, so a takeover resumes.
    let resume = env(c, "DELTADOC_RESUME_DIR").unwrap()["value"].as_str().unwrap().to_string();
    let claim = volume_of(&pod["spec"], c, &resume)["persistentVolumeClaim"]["claimName"].clone();
    assert_eq!(claim, "deltadoc-documents", "the resume folder is on the shared documents volume");
    // The password file lies in a mounted secret, the one PostgreSQL reads its password from.
    let secret_of = |spec: &Value, container: &Value, file: &str| -> String {
        let vol = volume_of(spec, container, file);
        vol["secret"]["secretName"].as_str().unwrap_or_else(|| panic!("{file} is not in a secret")).to_string()
    };
    let daemon_pw = env(c, "DELTADOC_LEDGER_PASSWORD_FILE").unwrap()["value"].as_str().unwrap().to_string();
    let pg = &db["spec"]["template"]["spec"]["containers"][0];
    let pg_pw = env(pg, "POSTGRES_PASSWORD_FILE").unwrap()["value"].as_str().unwrap().to_string();
    assert_eq!(
        secret_of(&pod["spec"], c, &daemon_pw),
        secret_of(&db["spec"]["template"]["spec"], pg, &pg_pw),
        "the daemons and PostgreSQL read one secret"
    );
    // The base's Service (and so its ServiceMonitor) selects the fleet's pods.
    let base_svc: Value = serde_saphyr::from_str(&std::fs::read_to_string(deploy("k8s/service.yaml")).unwrap()).unwrap();
    for (k, v) in base_svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "Service selector {k} does not match the fleet's pods");
    }
    let declared: BTreeSet<&str> =
        pod["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(declared.contains(m["name"].as_str().unwrap()), "volume {} is mounted but not declared", m["name"]);
    }
    match tool("kubernetes-validate") {
        Some(kv) => {
            let out =
                run_clean(Command::new(kv).arg("--strict").arg(fleet.join("deployment.yaml")).arg(fleet.join("postgres.yaml")));
            assert_eq!(out.matches("passed").count(), 3, "{out}");
        }
        None => skipped("kubernetes-validate of the fleet"),
    }

    // Compose: three daemons, one ledger service they wait for, secrets and volumes declared.
    let compose: Value = serde_saphyr::from_str(&std::fs::read_to_string(deploy("compose/fleet.yaml")).unwrap()).unwrap();
    let services = compose["services"].as_object().unwrap();
    let daemons: Vec<(&String, &Value)> =
        services.iter().filter(|(_, s)| s["environment"]["DELTADOC_LEDGER"].is_string()).collect();
    assert!(daemons.len() >= 3, "{} daemons", daemons.len());
    let names: BTreeSet<&str> = daemons.iter().map(|(_, s)| s["environment"]["DELTADOC_WORKER_NAME"].as_str().unwrap()).collect();
    assert_eq!(names.len(), daemons.len(), "worker names are unique");
    for (name, s) in &daemons {
        let (host, _) = ledger_host(s["environment"]["DELTADOC_LEDGER"].as_str().unwrap());
        assert!(services[&host]["healthcheck"].is_object(), "{name}: the ledger service {host} has no health check");
        assert_eq!(s["depends_on"][&host]["condition"], "service_healthy", "{name} starts before its ledger");
        assert!(s["volumes"].as_array().unwrap().iter().any(|v| v.as_str().unwrap().ends_with(":/srv/deltadoc")));
        let resume = s["environment"]["DELTADOC_RESUME_DIR"].as_str().unwrap_or_else(|| panic!("{name}: no resume folder"));
        assert!(resume.starts_with("/srv/deltadoc/"), "{name}: the resume folder {resume} is not on the shared volume");
    }
    for (name, s) in services {
        for secret in s["secrets"].as_array().into_iter().flatten() {
            assert!(compose["secrets"][secret.as_str().unwrap()].is_object(), "{name}: secret {secret} is not declared");
        }
        for v in s["volumes"].as_array().into_iter().flatten() {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                source.starts_with('.') || compose["volumes"].get(source).is_some(),
                "{name}: volume {source} is not declared"
            );
        }
    }
    match tool("docker-compose") {
        Some(dc) => {
            run_clean(Command::new(dc).arg("--file").arg(deploy("compose/fleet.yaml")).args(["config", "--quiet"]));
        }
        None => skipped("docker-compose config of the fleet"),
    }
}
