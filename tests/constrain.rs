//! The JSON Schema constraint over the real Qwen3.5 vocabulary (248,077 tokens): tokens that
//! span JSON structure, unicode, numbers, enums, required fields and maxLength, and random
//! walks through the mask that must always end in a valid document within the schema's bound;
//! and a quantised model's head computing only the allowed tokens' logits, exactly.

mod common;

use std::sync::OnceLock;

use deltadoc::constrain::{Constraint, Schema, Vocabulary};
use deltadoc::generate::{DecodeOptions, Decoder, Logits, Sampling, TokenFilter};
use deltadoc::model::quant::Precision;
use deltadoc::runtime::SessionOptions;
use deltadoc::tokenizer::{IM_END, SPECIAL_START, SPECIALS, Tokenizer};
use serde_json::{Value, json};

const VOCAB: usize = SPECIAL_START as usize + SPECIALS.len();

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = common::scratch_dir();
        deltadoc::tokenizer::write_qwen35_tokenizer(dir).unwrap();
        Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
    })
}

fn vocabulary() -> &'static Vocabulary {
    static V: OnceLock<Vocabulary> = OnceLock::new();
    V.get_or_init(|| Vocabulary::new(tokenizer()).unwrap())
}

fn contract_like() -> Schema {
    Schema::new(json!({
        "type": "object", "additionalProperties": false,
        "required": ["title", "kind", "amount", "parties"],
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "kind": {"enum": ["nda", "services agreement", "license"]},
            "amount": {"type": ["number", "null"], "minimum": 0, "maximum": 1e9, "multipleOf": 0.01},
            "parties": {"type": "array", "maxItems": 3, "items": {
                "type": "object", "additionalProperties": false, "required": ["name"],
                "properties": {"name": {"type": "string", "maxLength": 30}, "role": {"type": ["string", "null"], "maxLength": 20}}
            }},
            "signed": {"type": ["string", "null"], "format": "date"}
        }
    }))
    .unwrap()
}

/// Feeds the tokenization of `text` through the constraint; the index of the first token the
/// mask forbids, if any.
fn first_forbidden(c: &mut Constraint, text: &str) -> Option<usize> {
    for (i, &t) in tokenizer().encode(text).unwrap().iter().enumerate() {
        let mut logits = vec![0f32; VOCAB];
        c.apply(&mut logits).unwrap();
        if logits[t as usize] == f32::NEG_INFINITY {
            return Some(i);
        }
        c.commit(t).unwrap();
    }
    None
}

fn accepts(schema: &Schema, text: &str) -> bool {
    let mut c = vocabulary().constraint(schema).unwrap();
    first_forbidden(&mut c, text).is_none() && c.is_accepting()
}

#[test]
fn valid_documents_pass_token_by_token_whatever_the_tokenization() {
    let s = contract_like();
    let docs = [
        // Multi-character tokens that span structure (`":"`, `"},{"`, `"]`, `null}`).
        r#"{"title":"Mutual NDA","kind":"nda","amount":null,"parties":[{"name":"Acme","role":"discloser"},{"name":"Beta","role":null}]}"#,
        // Unicode in strings: accents, CJK, an emoji (4 UTF-8 bytes), RTL; escapes other than \u.
        r#"{"title":"Contrat de licence – é漢字🙂 שלום","kind":"license","amount":1234.5,"parties":[],"signed":"2024-02-29"}"#,
        r#"{"title":"Line\nbreak \"quoted\" back\\slash","kind":"services agreement","amount":0,"parties":[{"name":"X"}]}"#,
    ];
    for d in docs {
        let v: Value = serde_json::from_str(d).unwrap();
        s.validate(&v).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert!(accepts(&s, d), "valid document refused: {d}");
        assert!(d.len() <= s.max_tokens());
    }
}

#[test]
fn invalid_continuations_are_masked() {
    let s = contract_like();
    let cases = [
        (r#"{"title":"a","kind":"nda","amount":null}"#, "required `parties` missing"),
        (r#"{"title":"a","kind":"lease""#, "not in the enum"),
        (r#"{"title":"a","kind":"nda","amount":12.345"#, "more decimals than multipleOf 0.01"),
        (r#"{"title":"a","kind":"nda","amount":1e3"#, "exponent"),
        (r#"{"title":"a","kind":"nda","amount":-1"#, "below minimum"),
        (r#"{"title":"a","kind":"nda","amount":null,"parties":[],"extra":1"#, "additional property"),
        (r#"{"title":"\u00e9""#, "\\u escapes are not allowed"),
        (r#"{"title":"a","kind":"nda","amount":null,"parties":[],"signed":"yesterday""#, "not a date"),
        (r#"{ "title":"a""#, "optional whitespace"),
    ];
    let forbidden = |text: &str| first_forbidden(&mut vocabulary().constraint(&s).unwrap(), text).is_some();
    for (text, why) in cases {
        assert!(forbidden(text), "no token refused ({why}): {text}");
    }
    // Each case is one step away from a valid prefix.
    assert!(!forbidden(r#"{"title":"a","kind":"nda","amount":12.34"#));
    assert!(!forbidden(r#"{"title":"a","kind":"nda","amount":null,"parties":[]"#));
    let long = format!(r#"{{"title":"{}""#, "x".repeat(41));
    assert!(forbidden(&long), "maxLength 40 exceeded");
    let at_limit = format!(r#"{{"title":"{}","kind":"nda","amount":null,"parties":[]}}"#, "x".repeat(40));
    assert!(accepts(&s, &at_limit), "maxLength 40 reached exactly");
}

#[test]
fn the_end_token_is_allowed_exactly_when_the_document_is_complete() {
    let s = contract_like();
    let mut c = vocabulary().constraint(&s).unwrap();
    let text = r#"{"title":"a","kind":"nda","amount":null,"parties":[]}"#;
    let ids = tokenizer().encode(text).unwrap();
    for (i, &t) in ids.iter().enumerate() {
        let mut logits = vec![0f32; VOCAB];
        c.apply(&mut logits).unwrap();
        assert_eq!(logits[IM_END as usize], f32::NEG_INFINITY, "end allowed after {i} of {} tokens", ids.len());
        c.commit(t).unwrap();
    }
    let mut logits = vec![0f32; VOCAB];
    c.apply(&mut logits).unwrap();
    assert!(logits[IM_END as usize].is_finite(), "end token allowed once complete");
    let allowed = logits.iter().filter(|l| l.is_finite()).count();
    assert!(allowed <= 2, "only the end (and <|endoftext|>-like) tokens remain: {allowed}");
}

/// Picks the highest of `logits + noise` (a model with random weights).
fn random_pick(logits: &[f32], rng: &mut u64) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_finite() {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            let v = (*rng >> 40) as f32 / (1u64 << 24) as f32;
            if v > best.0 {
                best = (v, i as u32);
            }
        }
    }
    best.1
}

#[test]
fn random_walks_always_end_valid_within_the_bound() {
    let s = contract_like();
    let mut mask_secs = 0.0;
    let mut steps = 0;
    for seed in 1..=12u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut c = vocabulary().constraint(&s).unwrap();
        let mut out = Vec::new();
        loop {
            assert!(out.len() <= s.max_tokens(), "seed {seed}: {} tokens, over the bound", out.len());
            let mut logits = vec![0f32; VOCAB];
            c.apply(&mut logits).unwrap();
            let t = random_pick(&logits, &mut rng);
            if t == IM_END {
                break;
            }
            c.commit(t).unwrap();
            out.push(t);
        }
        let text = tokenizer().decode(&out).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {text}"));
        s.validate(&v).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        mask_secs += c.mask_time.as_secs_f64();
        steps += c.steps;
    }
    eprintln!("mask: {:.3} ms per token over {steps} tokens", 1e3 * mask_secs / steps as f64);
}

/// A filter over the schema that tells the decode loop its allowed tokens, or keeps them to
/// itself (the full head computes every logit).
struct SchemaRows {
    constraint: Constraint,
    tell: bool,
}

impl TokenFilter for SchemaRows {
    fn allowed(&mut self, out: &mut Vec<u32>) -> anyhow::Result<()> {
        out.clear();
        if self.tell { self.constraint.allowed(out) } else { Ok(()) }
    }

    fn mask(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        self.constraint.apply(logits)
    }

    fn accept(&mut self, token: u32) -> anyhow::Result<()> {
        self.constraint.commit(token)
    }
}

#[test]
fn a_head_that_computes_only_the_allowed_rows_gives_the_full_heads_logits_for_them() {
    let s = contract_like();
    let opts = SessionOptions::with_threads(2);
    for precision in [Precision::Int8, Precision::Int4] {
        let dir = common::open(&common::imported("fullvocab", precision));
        let prompt = tokenizer().encode("Extract the contract's fields as JSON.").unwrap();
        let (mut some, mut all) = (Decoder::open(&dir, &opts).unwrap(), Decoder::open(&dir, &opts).unwrap());
        let first = some.prefill(&prompt, 16, |_, _| Ok(())).unwrap();
        assert_eq!(first, all.prefill(&prompt, 16, |_, _| Ok(())).unwrap());

        // Step by step: the allowed rows bit for bit as the full head has them, −∞ elsewhere.
        let mut c = vocabulary().constraint(&s).unwrap();
        let (mut logits, mut rows) = (first.clone(), Vec::new());
        let mut sparse_steps = 0;
        for step in 0..48 {
            c.apply(&mut logits).unwrap();
            let t = deltadoc::generate::argmax(&logits);
            if t == IM_END {
                break;
            }
            c.commit(t).unwrap();
            c.allowed(&mut rows).unwrap();
            sparse_steps += usize::from(rows.len() < VOCAB / 2);
            let got = some.forward_rows(&[t], &rows).unwrap().row(0).to_vec();
            let full = all.forward(&[t], Logits::Last).unwrap().row(0).to_vec();
            assert_eq!(got.len(), full.len());
            let mut next = 0;
            for (i, (&g, &f)) in got.iter().zip(&full).enumerate() {
                if rows.get(next) == Some(&(i as u32)) {
                    next += 1;
                    assert_eq!(g.to_bits(), f.to_bits(), "{precision:?} step {step}: token {i} {g} vs the full head's {f}");
                } else {
                    assert_eq!(g, f32::NEG_INFINITY, "{precision:?} step {step}: token {i} was not asked for");
                }
            }
            logits = full;
        }
        assert!(sparse_steps >= 10, "{precision:?}: only {sparse_steps} steps allowed few tokens");

        // Through the decode loop: the same tokens whether or not the filter tells its rows.
        let decode = |tell: bool| {
            let mut dec = Decoder::open(&dir, &opts).unwrap();
            let logits = dec.prefill(&prompt, 16, |_, _| Ok(())).unwrap();
            let mut f = SchemaRows { constraint: vocabulary().constraint(&s).unwrap(), tell };
            let o = DecodeOptions {
                max_new_tokens: 64,
                sampling: Sampling { temperature: 0.8, seed: 7, ..Sampling::default() },
                stop_tokens: vec![IM_END],
            };
            deltadoc::generate::decode(&mut dec, logits, &o, Some(&mut f), |_| Ok(())).unwrap().0
        };
        let told = decode(true);
        assert_eq!(told, decode(false), "{precision:?}");
        assert!(told.len() > 10, "{precision:?}: {} tokens", told.len());
    }
}

#[test]
fn constrained_and_free_sequences_decoded_together_give_what_each_gives_alone() {
    use deltadoc::generate::{Decoding, Member, decode};
    let s = contract_like();
    let opts = SessionOptions::with_threads(2);
    let dir = common::open(&common::imported("fullvocab", Precision::Int8));
    let mut dec = Decoder::open(&dir, &opts).unwrap();
    // (prompt, constrained, sampling, token limit): the free sequence ends first and leaves.
    let members = [
        ("Extract the contract's fields as JSON.", true, Sampling { temperature: 0.8, seed: 7, ..Sampling::default() }, 40),
        ("Summarise the agreement in one sentence, please.", false, Sampling::default(), 12),
        ("Fields:", true, Sampling::default(), 40),
    ];
    let options = |&(_, _, ref sampling, max): &(&str, bool, Sampling, usize)| DecodeOptions {
        max_new_tokens: max,
        sampling: sampling.clone(),
        stop_tokens: vec![IM_END],
    };
    let filter =
        |constrained: bool| constrained.then(|| SchemaRows { constraint: vocabulary().constraint(&s).unwrap(), tell: true });
    let mut starts = Vec::new();
    for m in &members {
        dec.reset().unwrap();
        let logits = dec.prefill(&tokenizer().encode(m.0).unwrap(), 16, |_, _| Ok(())).unwrap();
        starts.push((dec.snapshot().unwrap(), logits));
    }
    let alone: Vec<(Vec<u32>, String)> = members
        .iter()
        .zip(&starts)
        .map(|(m, (snap, logits))| {
            dec.restore(snap).unwrap();
            let mut f = filter(m.1);
            decode(&mut dec, logits.clone(), &options(m), f.as_mut().map(|f| f as &mut dyn TokenFilter), |_| Ok(())).unwrap()
        })
        .collect();

    // Two rows: the third joins when the free sequence leaves.
    let mut decoding = Decoding::new();
    let mut waiting = members.iter().zip(&starts).enumerate();
    let mut together: Vec<Option<(Vec<u32>, String)>> = vec![None; members.len()];
    let mut seen = vec![Vec::new(); members.len()];
    let mut joined_at = Vec::new();
    for step in 0.. {
        while decoding.len() < 2
            && let Some((i, (m, (snap, logits)))) = waiting.next()
        {
            let member = Member { logits: logits.clone(), opts: options(m), filter: filter(m.1) };
            decoding.join(&dec, i, member, snap.clone()).unwrap();
            joined_at.push(step);
        }
        if decoding.is_empty() {
            break;
        }
        let ended = decoding
            .step(&mut dec, |i, t| {
                seen[i].push(t);
                Ok(())
            })
            .unwrap();
        for e in ended {
            together[e.id] = Some((e.tokens, e.why));
        }
    }
    let together: Vec<(Vec<u32>, String)> = together.into_iter().map(Option::unwrap).collect();
    assert_eq!(joined_at, [0, 0, 12], "the third joined right after the step that chose the free one's last token");
    assert_eq!(together, alone);
    for (i, (tokens, why)) in together.iter().enumerate() {
        assert_eq!(&seen[i], tokens, "member {i}: the tokens as they came");
        println!("member {i}: {} tokens, {why}: {:?}", tokens.len(), tokenizer().decode(tokens).unwrap_or_default());
    }
    assert_eq!(together[1].0.len(), 12, "the free sequence runs to its limit, before the others end");
    assert!(together[0].0.len() > 12 && together[2].0.len() > 12, "the constrained ones go on after it leaves");
}
