//! The orchestration of one document with a fake model ([`crate::llm::fake`]): chunking,
//! map-reduce over several levels and its truncation path, the extract stage's merge across
//! chunks, and the classify stage's vote. One token is one byte here, so sizes are exact.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::{Context, DocLimits, process};
use crate::config::{Pipeline, load_pipeline};
use crate::extract::ExtractLimits;
use crate::extract::isolated::Extraction;
use crate::llm::fake::{Answer, Asked, FakeModel};
use crate::output::DocResult;
use crate::stage::{Journal, Runner, Stop};

/// A pipeline file and a document in a temporary folder.
struct Doc {
    dir: tempfile::TempDir,
    pipeline: Pipeline,
}

impl Doc {
    fn new(pipeline_yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, format!("name: p\ninboxes: [{{path: in}}]\noutput: out\n{pipeline_yaml}")).unwrap();
        let pipeline = load_pipeline(&file, Some(dir.path())).unwrap();
        Self { dir, pipeline }
    }

    /// Runs `text` (as a Markdown file) through the pipeline with `model`.
    fn run(&self, text: &str, model: &mut FakeModel) -> Result<DocResult, Stop> {
        self.run_journaled(text, model, None)
    }

    /// [`Doc::run`] keeping the model calls in `journal`.
    fn run_journaled(&self, text: &str, model: &mut FakeModel, journal: Option<&Journal>) -> Result<DocResult, Stop> {
        let source: PathBuf = self.dir.path().join("doc.md");
        std::fs::write(&source, text).unwrap();
        let limits = DocLimits { max_file_bytes: 1 << 20, memory_budget: 1 << 30, documents: 1, max_batch: 8 };
        self.with_context(model, limits, journal, |ctx| process(ctx, &source, Path::new("doc.md"), None))
    }

    /// Runs `f` with this pipeline's context around `model`.
    fn with_context<T>(
        &self,
        model: &mut FakeModel,
        limits: DocLimits,
        journal: Option<&Journal>,
        f: impl FnOnce(&mut Context) -> T,
    ) -> T {
        let shutdown = AtomicBool::new(false);
        let runner = Runner {
            model,
            deadline: Instant::now() + Duration::from_secs(60),
            shutdown: &shutdown,
            abandoned: &shutdown,
            on_step: &mut |_| {},
            on_prefill: &|_| {},
            heartbeat: &|| {},
            on_child: &|_| {},
            journal,
        };
        let extraction = Extraction::InProcess(ExtractLimits { max_pages: 100 });
        f(&mut Context { pipeline: &self.pipeline, limits, extraction: &extraction, runner })
    }
}

/// `n` paragraphs of about 100 bytes each, the i-th naming itself.
fn paragraphs(n: usize) -> String {
    (0..n).map(|i| format!("Paragraph {i:03}: {}", "lorem ipsum dolor sit amet ".repeat(3))).collect::<Vec<_>>().join("\n\n")
}

/// Which part of how many a map call is about, from its instruction.
fn part_of(a: &Asked) -> Option<(usize, usize)> {
    let rest = a.instruction.split("is part ").nth(1)?;
    let mut words = rest.split_whitespace();
    let part = words.next()?.parse().ok()?;
    let of = words.nth(1)?.parse().ok()?;
    Some((part, of))
}

#[test]
fn map_reduce_combines_level_after_level_and_cuts_an_answer_longer_than_a_context() {
    let doc =
        Doc::new("context: {max_tokens: 1024, overlap: 0}\nstages:\n  - {name: summary, kind: summarize, max_new_tokens: 200}\n");
    let mut reduces = 0;
    let mut model = FakeModel::new(262_144, move |a| match part_of(a) {
        // Part answers that do not fit one context two at a time; part 2's alone is longer
        // than a whole context.
        Some((2, _)) => Answer::Text("x".repeat(2000)),
        Some((p, _)) => Answer::Text(format!("summary of part {p} ").repeat(12)),
        None => {
            reduces += 1;
            Answer::Text(format!("combined {reduces}"))
        }
    });
    let r = doc.run(&paragraphs(40), &mut model).unwrap();
    let parts = r.chunks.len();
    assert!(parts >= 4, "{parts} chunks");
    let s = &r.stages["summary"];
    assert_eq!(s.parts.len(), parts, "one answer per chunk");
    // Level 1 combines the parts in groups (one each here), level 2 combines those.
    let level1 = parts;
    assert_eq!(s.calls, parts + level1 + 1, "map calls, then two reduce levels");
    assert_eq!(s.output, format!("combined {}", level1 + 1), "the last reduce answers");
    let last = model.asked.last().unwrap();
    assert!(last.instruction.contains("one summary of the whole document"), "{}", last.instruction);
    assert!((1..=level1).all(|k| last.document.contains(&format!("combined {k}"))), "the top level sees every group");
    assert!(r.truncated, "the 2,000-token answer was cut");
    assert!(r.warnings.iter().any(|w| w.contains("1 part answer(s) longer than a context were cut")), "{:?}", r.warnings);
    assert_eq!(r.stages["summary"].kind, "summarize");
}

#[test]
fn extract_merges_the_chunks_fields_with_provenance() {
    let doc = Doc::new(
        "context: {max_tokens: 2048, overlap: 0}
stages:
  - name: terms
    kind: extract
    instruction: Extract the parties and the date.
    schema:
      type: object
      additionalProperties: false
      required: [parties, date]
      properties:
        parties: {type: array, maxItems: 4, items: {type: string, maxLength: 12}}
        date: {type: string, maxLength: 10}
",
    );
    let mut model = FakeModel::new(262_144, |a| {
        assert!(a.constrained, "extract calls carry the schema");
        Answer::Text(match part_of(a) {
            Some((1, _)) => r#"{"parties":["Acme GmbH"],"date":""}"#.into(),
            Some((2, _)) => r#"{"parties":["Beta Ltd","acme  gmbh"],"date":"2027-03-01"}"#.into(),
            Some(_) => r#"{"parties":[],"date":"2028-01-01"}"#.into(),
            None => panic!("an extract stage has no reduce call"),
        })
    });
    let r = doc.run(&paragraphs(60), &mut model).unwrap();
    assert!(r.chunks.len() >= 3, "{} chunks", r.chunks.len());
    let t = &r.stages["terms"];
    assert_eq!(t.output, serde_json::json!({"parties": ["Acme GmbH", "Beta Ltd"], "date": "2027-03-01"}));
    assert_eq!(t.parts.len(), r.chunks.len());
    assert_eq!(t.calls, r.chunks.len(), "one call per chunk, no reduce");
    let prov = t.provenance.as_ref().unwrap();
    assert_eq!(prov["/date"]["chunk"], 1, "{prov}");
    assert_eq!(prov["/date"]["others"], 1, "one other date (however many chunks gave it): {prov}");
    assert_eq!(prov["/parties/1"]["chunk"], 1, "{prov}");
    assert!(t.schema.is_some());
}

#[test]
fn an_extract_answer_that_breaks_the_schema_fails_the_stage_as_a_model_failure() {
    let doc = Doc::new(
        "stages:\n  - {name: f, kind: extract, instruction: x, schema: {type: object, additionalProperties: false, required: [a], properties: {a: {type: string, maxLength: 3}}}}\n",
    );
    let mut model = FakeModel::new(262_144, |_| Answer::Text(r#"{"a":"too long"}"#.into()));
    match doc.run("A short document.", &mut model) {
        Err(Stop::Failed(f)) => {
            assert_eq!((f.reason, f.stage.as_str()), (crate::failure::Reason::Model, "f"));
            assert!(f.message.contains("chunk 0"), "{}", f.message);
        }
        other => panic!("expected a model failure, got {other:?}"),
    }
}

#[test]
fn classify_takes_the_label_most_chunks_gave() {
    let stage = "  - {name: doctype, kind: classify, labels: [contract, invoice, letter]}\n";
    let doc = Doc::new(&format!("context: {{max_tokens: 1024, overlap: 0}}\nstages:\n{stage}"));
    let mut model = FakeModel::new(262_144, |a| {
        assert!(a.constrained && a.instruction.contains("\"contract\", \"invoice\", \"letter\""), "{}", a.instruction);
        Answer::Text(if part_of(a).is_some_and(|(p, _)| p == 1) { "\"invoice\"" } else { "\"contract\"" }.into())
    });
    let r = doc.run(&paragraphs(30), &mut model).unwrap();
    let s = &r.stages["doctype"];
    assert!(r.chunks.len() >= 3);
    assert_eq!(s.output, "contract");
    assert_eq!(s.parts[0], "invoice");
    assert_eq!(s.kind, "classify");
    // One chunk: its label, no parts.
    let mut model = FakeModel::new(262_144, |_| Answer::Text("\"letter\"".into()));
    let r = doc.run("Dear Sir, thank you for your letter.", &mut model).unwrap();
    assert_eq!((r.stages["doctype"].output.as_str(), r.stages["doctype"].parts.len()), (Some("letter"), 0));
}

#[test]
fn classify_is_configured_with_two_or_more_distinct_labels() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    for (labels, why) in [("[only]", "at least two labels"), ("[a, b, a]", "appears twice"), ("[a, \" \"]", "1 to 200")] {
        let yaml = format!(
            "name: p\ninboxes: [{{path: in}}]\noutput: out\nstages:\n  - {{name: c, kind: classify, labels: {labels}}}\n"
        );
        std::fs::write(&file, yaml).unwrap();
        let e = format!("{:#}", load_pipeline(&file, Some(dir.path())).unwrap_err());
        assert!(e.contains("p.yaml:5:") && e.contains("stages[0].labels") && e.contains(why), "{labels}: {e}");
    }
}

/// A summary and a prompt stage (named `names`, the prompt making up to `prompt_tokens`) on
/// contexts of 1,024 tokens.
fn summary_and_prompt(names: [&str; 2], prompt_tokens: usize) -> Doc {
    let [summary, prompt] = names;
    Doc::new(&format!(
        "context: {{max_tokens: 1024, overlap: 0}}
stages:
  - {{name: {summary}, kind: summarize, max_new_tokens: 16}}
  - {{name: {prompt}, kind: prompt, instruction: List the parties., max_new_tokens: {prompt_tokens}}}
"
    ))
}

#[test]
fn the_stages_of_a_chunk_share_its_prefill_and_the_budget_leaves_room_for_every_stage() {
    let doc = summary_and_prompt(["short", "long"], 300);
    let mut model = FakeModel::new(262_144, |_| Answer::Text("ok".into()));
    let r = doc.run(&paragraphs(20), &mut model).unwrap();
    // Every chunk plus the largest stage's prompt and output fits the context.
    for c in &r.chunks {
        assert!(c.tokens + 300 <= 1024, "chunk {} has {} tokens", c.index, c.tokens);
    }
    // Map calls alternate between the stages chunk by chunk, on the same document text.
    let maps: Vec<&Asked> = model.asked.iter().filter(|a| part_of(a).is_some()).collect();
    for pair in maps.chunks(2).take(r.chunks.len()) {
        assert_eq!(pair[0].document, pair[1].document, "both stages of a chunk see the same document");
        assert!(pair[0].instruction.contains("Summarise this part") && pair[1].instruction.contains("List the parties."));
    }
}

#[test]
fn the_stages_reduce_calls_decode_together_round_by_round() {
    let doc = summary_and_prompt(["summary", "parties"], 16);
    // The summary's part answers need two rounds of reduce calls (two parts fill a context), the
    // parties' one.
    let mut model = FakeModel::new(262_144, |a| match part_of(a) {
        Some((p, _)) if a.instruction.contains("Summarise this part") => Answer::Text(format!("summary {p} ").repeat(45)),
        Some(_) => Answer::Text("parties".into()),
        None if a.instruction.contains("one summary of the whole document") => {
            Answer::Text(format!("combined summary of {} bytes", a.document.len()))
        }
        None => Answer::Text(format!("combined parties of {} bytes", a.document.len())),
    });
    let r = doc.run(&paragraphs(20), &mut model).unwrap();
    let n = r.chunks.len();
    assert!(n >= 4, "{n} chunks");
    let (summary, parties) = (&r.stages["summary"], &r.stages["parties"]);
    let groups = summary.calls - n - 1;
    assert!(groups >= 2, "the summary's first round combines in {groups} group(s)");
    assert_eq!(parties.calls, n + 1);
    // The chunks' calls, then the first reduce round of both stages in one batch, then the
    // summary's last.
    let sizes: Vec<usize> = model.batches.iter().map(|b| b.0).collect();
    assert_eq!(sizes, [2 * n, groups + 1, 1]);
    assert_eq!(model.batches[1].1, groups + 1, "the budget holds them all at once");
    assert!(summary.output.as_str().unwrap().starts_with("combined summary"), "{}", summary.output);
    assert!(parties.output.as_str().unwrap().starts_with("combined parties"), "{}", parties.output);
    assert_eq!(summary.parts.len(), n);
    assert!(summary.parts.iter().all(|p| p.as_str().unwrap().starts_with("summary ")));
    // Each stage counts the rounds it took part in, and only those.
    assert!(summary.duration_s >= parties.duration_s);
}

#[test]
fn a_later_attempt_takes_the_calls_an_earlier_one_completed_from_the_journal() {
    let doc = summary_and_prompt(["summary", "parties"], 16);
    let text = paragraphs(20);
    let state = tempfile::tempdir().unwrap();
    let journal = Journal::of_job(state.path(), 1);
    // The first attempt fails at its fifth call (the model failed; a kill loses as much).
    let answer = |a: &Asked| Answer::Text(format!("answer to {} bytes", a.document.len() + a.instruction.len()));
    let mut first = FakeModel::new(262_144, answer).script((0..4).map(|i| Answer::Text(format!("kept {i}"))));
    first = first.script([Answer::Fail("the runtime failed".into())]);
    assert!(matches!(doc.run_journaled(&text, &mut first, Some(&journal)), Err(Stop::Failed(_))));
    assert_eq!(first.asked.len(), 5);

    let mut second = FakeModel::new(262_144, answer);
    let r = doc.run_journaled(&text, &mut second, Some(&journal)).unwrap();
    let uninterrupted = {
        let mut m = FakeModel::new(262_144, answer);
        let r = doc.run(&text, &mut m).unwrap();
        assert_eq!(m.asked.len(), second.asked.len() + 4, "the four completed calls are not asked again");
        r
    };
    assert_eq!(&second.asked[0].document, &first.asked[4].document, "the failed call is the first one asked again");
    let parts = |r: &DocResult, stage: &str| r.stages[stage].parts.clone();
    assert_eq!(parts(&r, "summary")[..2], [serde_json::json!("kept 0"), serde_json::json!("kept 2")]);
    assert_eq!(parts(&r, "parties")[..2], [serde_json::json!("kept 1"), serde_json::json!("kept 3")]);
    assert_eq!(parts(&r, "summary")[2..], parts(&uninterrupted, "summary")[2..], "the rest as without the failure");

    // A third attempt asks nothing: every call is in the journal.
    let mut third = FakeModel::new(262_144, answer);
    let again = doc.run_journaled(&text, &mut third, Some(&journal)).unwrap();
    assert!(third.asked.is_empty(), "{:?}", third.asked.len());
    assert_eq!(again.stages["summary"].output, r.stages["summary"].output);
}

#[test]
fn calls_decode_together_up_to_max_batch_and_as_far_as_the_memory_plan_allows() {
    let doc = Doc::new("stages:\n  - {name: summary, kind: summarize}\n");
    let mut model = FakeModel::new(262_144, |_| Answer::Text(String::new()));
    let width = |model: &mut FakeModel, max_batch: usize, memory_budget: u64, contexts: &[usize]| {
        let limits = DocLimits { max_file_bytes: 1 << 20, memory_budget, documents: 1, max_batch };
        doc.with_context(model, limits, None, |ctx| super::budget::width(ctx, contexts, true))
    };
    // The fake plans a kilobyte a token, and as much again for each sequence decoding at once.
    assert_eq!(width(&mut model, 3, 1 << 30, &[1000; 7]), 3);
    assert_eq!(width(&mut model, 1, 1 << 30, &[1000; 3]), 1);
    assert_eq!(width(&mut model, 8, 1 << 30, &[1000; 2]), 2, "no wider than the calls");
    // 3,072 KiB hold one context of 1,000 tokens and two sequences, not three.
    assert_eq!(width(&mut model, 8, 3 << 20, &[1000; 5]), 2);
    // The longest call sets the width; one at a time always runs (the plan of one fits).
    assert_eq!(width(&mut model, 8, 3 << 20, &[100, 100, 1200, 100]), 1);
    assert_eq!(width(&mut model, 8, 3 << 20, &[]), 1);
}
