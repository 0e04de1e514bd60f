//! The model stage's prefix reuse: a stage that restores the document's saved state must
//! generate exactly what a fresh prefill of the same prompt generates; stages decoded together
//! (`TextModel::complete_batch`) exactly what each generates in turn.

mod common;

use deltadoc::chat::stage_prompt;
use deltadoc::generate::{DEFAULT_PREFILL_CHUNK, DecodeOptions, Sampling};
use deltadoc::llm::ort::{OrtModel, RuntimeSettings};
use deltadoc::llm::{Request, TextModel};
use deltadoc::model::quant::Precision;
use deltadoc::runtime::SessionOptions;
use deltadoc::tokenizer::STOP_TOKENS;

#[test]
fn restored_prefix_generates_what_a_fresh_prefill_does() {
    let dir = common::open(&common::imported("fullvocab", Precision::Fp32));
    let opts = SessionOptions::with_threads(1);
    let mut reused = OrtModel::open(&dir, &opts, RuntimeSettings::new(DEFAULT_PREFILL_CHUNK)).unwrap();
    let mut fresh = OrtModel::open(&dir, &opts, RuntimeSettings::new(DEFAULT_PREFILL_CHUNK)).unwrap();
    // Sampling makes the output depend on every logit, so any state difference shows.
    let sampling = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 };
    let options = DecodeOptions { max_new_tokens: 24, sampling, stop_tokens: STOP_TOKENS.to_vec() };
    let doc =
        reused.tokenizer().encode("This Supply Agreement is made between Acme GmbH and Beta Ltd. on 1 March 2027.").unwrap();
    let (p, s1) = stage_prompt(reused.tokenizer(), &doc, "Summarise the agreement.", false).unwrap();
    let (_, s2) = stage_prompt(reused.tokenizer(), &doc, "List the parties.", false).unwrap();
    let run = |m: &mut OrtModel, suffix: &[u32], keep: bool| {
        let req = Request {
            prefix: &p,
            suffix,
            keep_prefix: keep,
            options: &options,
            check: &|| Ok(()),
            on_prefill: &|_| {},
            schema: None,
            think_budget: None,
        };
        m.complete(&req).unwrap()
    };
    let first = run(&mut reused, &s1, true);
    let second = run(&mut reused, &s2, true);
    assert_eq!(second.prefilled_tokens, s2.len(), "the document was not prefilled again");
    assert_eq!(first.prefilled_tokens, p.len() + s1.len());
    let want = run(&mut fresh, &s2, false);
    assert_eq!(second.text, want.text, "reused prefix changed the output");
    assert_eq!(second.generated_tokens, want.generated_tokens);
    assert_ne!(first.text, second.text, "the instruction matters");
}

#[test]
fn stages_decoded_together_give_what_each_gives_in_turn() {
    use deltadoc::constrain::Schema;
    let dir = common::open(&common::imported("fullvocab", Precision::Int8));
    let opts = SessionOptions::with_threads(2);
    let mut in_turn = OrtModel::open(&dir, &opts, RuntimeSettings::new(DEFAULT_PREFILL_CHUNK)).unwrap();
    let doc = in_turn
        .tokenizer()
        .encode("This Supply Agreement is made between Acme GmbH and Beta Ltd. on 1 March 2027 for 40,000 EUR.")
        .unwrap();
    let schema = Schema::new(serde_json::json!({
        "type": "object", "additionalProperties": false, "required": ["parties", "amount"],
        "properties": {
            "parties": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 12}},
            "amount": {"type": ["number", "null"], "minimum": 0, "maximum": 1e9, "multipleOf": 0.01}
        }
    }))
    .unwrap();
    // A sampled summary, a greedy list, and a constrained extraction (the shortest limit first,
    // so a sequence leaves while the others decode).
    let stages = [
        ("Summarise the agreement.", Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 }, 24, None),
        ("List the parties.", Sampling::default(), 8, None),
        ("Extract the parties and the amount as JSON.", Sampling::default(), 48, Some(&schema)),
    ];
    let prompts: Vec<(Vec<u32>, Vec<u32>)> =
        stages.iter().map(|s| stage_prompt(in_turn.tokenizer(), &doc, s.0, false).unwrap()).collect();
    let options: Vec<DecodeOptions> = stages
        .iter()
        .map(|s| DecodeOptions { max_new_tokens: s.2, sampling: s.1.clone(), stop_tokens: STOP_TOKENS.to_vec() })
        .collect();
    let requests: Vec<Request> = prompts
        .iter()
        .zip(&options)
        .zip(&stages)
        .map(|(((p, s), o), stage)| Request {
            prefix: p,
            suffix: s,
            keep_prefix: true,
            options: o,
            check: &|| Ok(()),
            on_prefill: &|_| {},
            schema: stage.3,
            think_budget: None,
        })
        .collect();
    let alone: Vec<_> = requests.iter().map(|r| in_turn.complete(r).unwrap()).collect();
    // All three at once, then two at a time (the extraction joins when the list ends).
    for width in [3, 2] {
        let mut together = OrtModel::open(&dir, &opts, RuntimeSettings::new(DEFAULT_PREFILL_CHUNK)).unwrap();
        let mut told = Vec::new();
        let batched = together.complete_batch(&requests, width, &mut |i, c| told.push((i, c.text.clone()))).unwrap();
        told.sort();
        let replies: Vec<(usize, String)> = batched.iter().map(|c| c.text.clone()).enumerate().collect();
        assert_eq!(told, replies, "width {width}: each reply told once, with its request's index");
        for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
            println!("width {width}, stage {i}: {} tokens, {}: {:?}", b.generated_tokens, b.stopped_by, b.text);
            let (got, want) = ((&b.text, b.generated_tokens, &b.stopped_by), (&a.text, a.generated_tokens, &a.stopped_by));
            assert_eq!(got, want, "width {width}, stage {i}");
            assert_eq!(b.prefilled_tokens, a.prefilled_tokens, "width {width}, stage {i}: the document prefilled once in both");
        }
        assert_eq!(batched[0].prefilled_tokens, prompts[0].0.len() + prompts[0].1.len());
        assert_eq!(batched[2].prefilled_tokens, prompts[2].1.len());
        assert!(batched[2].mask_steps > 0, "the extraction was constrained");
        assert!(serde_json::from_str::<serde_json::Value>(&batched[2].text).is_ok(), "{:?}", batched[2].text);
    }
}

/// Two documents in flight on threads of their own (`llm/host.rs`), each asking for three
/// stages at once: their requests decode in the same steps, each document's prefix is prefilled
/// once and kept beside the other's, and every reply is what the document gets with the model to
/// itself, whether its plan holds three rows or one. A third document that gives up in the
/// middle leaves the others' replies unchanged.
#[test]
fn documents_in_flight_get_what_each_gets_alone() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = common::open(&common::imported("fullvocab", Precision::Int8));
    let opts = SessionOptions::with_threads(2);
    let mut alone = OrtModel::open(&dir, &opts, RuntimeSettings::new(DEFAULT_PREFILL_CHUNK)).unwrap();
    let texts = [
        "This Supply Agreement is made between Acme GmbH and Beta Ltd. on 1 March 2027 for 40,000 EUR.",
        "The Licensee shall pay Gamma Inc. a royalty of five percent of net sales, quarterly, for ten years.",
        "Either party may terminate this agreement with ninety days' written notice to the other party.",
    ];
    let stages = [
        ("Summarise the agreement.", Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 }, 20),
        ("List the parties.", Sampling::default(), 6),
        ("Who pays whom?", Sampling::default(), 14),
    ];
    let options: Vec<DecodeOptions> = stages
        .iter()
        .map(|s| DecodeOptions { max_new_tokens: s.2, sampling: s.1.clone(), stop_tokens: STOP_TOKENS.to_vec() })
        .collect();
    let prompts: Vec<Vec<(Vec<u32>, Vec<u32>)>> = texts
        .iter()
        .map(|t| {
            let doc = alone.tokenizer().encode(t).unwrap();
            stages.iter().map(|s| stage_prompt(alone.tokenizer(), &doc, s.0, false).unwrap()).collect()
        })
        .collect();
    let requests = |doc: usize, check: &'static (dyn Fn() -> anyhow::Result<()> + Sync)| -> Vec<Request<'_>> {
        prompts[doc]
            .iter()
            .zip(&options)
            .map(|((p, s), o)| Request {
                prefix: p,
                suffix: s,
                keep_prefix: true,
                options: o,
                check,
                on_prefill: &|_| {},
                schema: None,
                think_budget: None,
            })
            .collect()
    };
    let ok: &'static (dyn Fn() -> anyhow::Result<()> + Sync) = &|| Ok(());
    let want: Vec<Vec<(String, usize, usize)>> = (0..2)
        .map(|d| {
            requests(d, ok)
                .iter()
                .map(|r| {
                    let c = alone.complete(r).unwrap();
                    (c.text, c.generated_tokens, c.prefilled_tokens)
                })
                .collect()
        })
        .collect();
    let mut shared = OrtModel::open(&dir, &opts, RuntimeSettings::new(DEFAULT_PREFILL_CHUNK)).unwrap();
    // The third document's check fails at its tenth: after its prefill, while it decodes.
    static CHECKS: AtomicUsize = AtomicUsize::new(0);
    let quitter: &'static (dyn Fn() -> anyhow::Result<()> + Sync) = &|| {
        if CHECKS.fetch_add(1, Ordering::SeqCst) >= 10 { anyhow::bail!("deadline") } else { Ok(()) }
    };
    let got = deltadoc::llm::host::serve(&mut shared, 4, 3, &|| (), |model| {
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..3)
                .map(|d| {
                    let (mut m, requests) = (model(), &requests);
                    // The second document's memory plan holds one row: its requests take turns.
                    let width = if d == 1 { 1 } else { 3 };
                    s.spawn(move || m.complete_batch(&requests(d, if d == 2 { quitter } else { ok }), width, &mut |_, _| {}))
                })
                .collect();
            runs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        })
    })
    .unwrap();
    let err = got[2].as_ref().map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err:#}");
    for (d, want) in want.iter().enumerate() {
        let replies = got[d].as_ref().unwrap();
        let replies: Vec<(String, usize, usize)> =
            replies.iter().map(|c| (c.text.clone(), c.generated_tokens, c.prefilled_tokens)).collect();
        assert_eq!(&replies, want, "document {d}: text, generated and prefilled tokens as alone");
    }
}
