//! The model stage's prefix reuse: a stage that restores the document's saved state must
//! generate exactly what a fresh prefill of the same prompt generates.

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
