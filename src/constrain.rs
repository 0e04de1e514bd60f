//! Constrained decoding: generation restricted to the texts a JSON Schema accepts, so that every
//! output of an `extract` stage parses and validates, whatever the model's weights.
//!
//! The engine is llguidance, the one llama.cpp and onnxruntime-genai use: it walks a token trie
//! of the whole vocabulary against an Earley parser of the grammar and returns the set of
//! allowed next tokens in well under a decode step. deltadoc adds two things around it:
//!
//! - **A length bound.** A constraint alone does not end generation: a string without
//!   `maxLength` or a number with unbounded digits can run until the token limit cuts it, and a
//!   cut JSON is invalid. [`Schema::new`] therefore requires every string, array, number and
//!   object to be bounded and computes the longest accepted text in bytes; every token is at
//!   least one byte, so a stage given that many tokens always finishes its JSON.
//! - **Checks at configuration time.** Keywords llguidance cannot enforce and unbounded parts are
//!   reported by `deltadoc config check` with their JSON pointer, not at 2 a.m.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::tokenizer::{self, Tokenizer};

/// How llguidance renders JSON: no optional whitespace (a random or confused model could emit
/// it forever) and no `\u` escapes (so a character is at most 4 bytes, which the bound uses).
fn compile_options() -> Value {
    json!({
        "whitespace_flexible": false,
        "item_separator": ",",
        "key_separator": ":",
        "json_allowed_escapes": "nrbtf\"\\",
        "lenient": false,
    })
}

/// A JSON Schema that llguidance supports and whose outputs have a known maximum length.
#[derive(Clone, Debug)]
pub struct Schema {
    value: Value,
    max_bytes: usize,
    validator: Arc<jsonschema::Validator>,
}

impl Schema {
    /// Checks `value`: a valid JSON Schema, every keyword enforceable by the constraint, every
    /// part bounded. Errors name the JSON pointer of the offending part.
    pub fn new(value: Value) -> Result<Self> {
        let validator = jsonschema::validator_for(&value).map_err(|e| anyhow!("not a valid JSON Schema: {e}"))?;
        let max_bytes = Bound { root: &value, depth: 0 }.bytes(&value, "")?;
        // Compile once against a byte-level vocabulary: unsupported keywords fail here.
        let env = toktrie::ApproximateTokEnv::single_byte_env();
        let factory = ParserFactory::new_simple(&env)?;
        Matcher::new(factory.create_parser(grammar(&value))).get_error().map_or(Ok(()), |e| Err(anyhow!("{e}")))?;
        Ok(Self { value, max_bytes, validator: Arc::new(validator) })
    }

    /// The schema as written.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Most tokens an accepted output can take (each token is at least one byte).
    pub fn max_tokens(&self) -> usize {
        self.max_bytes
    }

    /// Validates a value against the schema (after generation and after merging).
    pub fn validate(&self, v: &Value) -> Result<()> {
        let errors: Vec<String> = self.validator.iter_errors(v).map(|e| format!("{}: {e}", e.instance_path())).collect();
        if errors.is_empty() { Ok(()) } else { bail!("output does not match the schema: {}", errors.join("; ")) }
    }
}

fn grammar(schema: &Value) -> TopLevelGrammar {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut() {
        o.insert("x-guidance".into(), compile_options());
    }
    TopLevelGrammar::from_json_schema(s)
}

/// Longest accepted JSON text per schema part, in bytes.
struct Bound<'a> {
    root: &'a Value,
    depth: usize,
}

impl Bound<'_> {
    fn bytes(&mut self, s: &Value, at: &str) -> Result<usize> {
        let here = if at.is_empty() { "the schema root".to_string() } else { format!("schema {at}") };
        if s == &Value::Bool(true) || s.as_object().is_some_and(|o| o.is_empty()) {
            bail!("{here} accepts any value, which has no length limit");
        }
        let Some(o) = s.as_object() else { bail!("{here} is not a schema object") };
        if let Some(c) = o.get("const") {
            return Ok(c.to_string().len());
        }
        if let Some(e) = o.get("enum").and_then(Value::as_array) {
            return Ok(e.iter().map(|v| v.to_string().len()).max().unwrap_or(0));
        }
        if let Some(r) = o.get("$ref").and_then(Value::as_str) {
            let target = r
                .strip_prefix('#')
                .and_then(|p| self.root.pointer(p))
                .ok_or_else(|| anyhow!("{here}: $ref {r:?} is not a local reference that resolves"))?;
            self.depth += 1;
            if self.depth > 32 {
                bail!("{here}: $ref {r:?} is recursive, so outputs have no length limit");
            }
            let n = self.bytes(target, r.trim_start_matches('#'))?;
            self.depth -= 1;
            return Ok(n);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(branches) = o.get(key).and_then(Value::as_array) {
                let mut max = 0;
                for (i, b) in branches.iter().enumerate() {
                    max = max.max(self.bytes(b, &format!("{at}/{key}/{i}"))?);
                }
                return Ok(max);
            }
        }
        if o.contains_key("allOf") {
            bail!("{here}: allOf is not supported in extraction schemas (merge the parts into one schema)");
        }
        let types: Vec<&str> = match o.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => bail!("{here} has no `type` (or const/enum/$ref/anyOf), so outputs have no length limit"),
        };
        let mut max = 0;
        for t in types {
            let n = match t {
                "null" => 4,
                "boolean" => 5,
                "integer" | "number" => number_bytes(o, t, &here)?,
                "string" => string_bytes(o, &here)?,
                "array" => {
                    let items = o.get("items").ok_or_else(|| anyhow!("{here}: an array needs `items`"))?;
                    let n = o
                        .get("maxItems")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| anyhow!("{here}: an array needs `maxItems` (its length bounds the output)"))?
                        as usize;
                    let item = self.bytes(items, &format!("{at}/items"))?;
                    2 + n * item + n.saturating_sub(1)
                }
                "object" => {
                    if o.get("additionalProperties") != Some(&Value::Bool(false)) {
                        bail!("{here}: an object needs `additionalProperties: false` (extra keys have no length limit)");
                    }
                    let props = o.get("properties").and_then(Value::as_object);
                    let mut n = 2;
                    for (k, v) in props.into_iter().flatten() {
                        n += Value::String(k.clone()).to_string().len() + 1 + self.bytes(v, &format!("{at}/properties/{k}"))? + 1;
                    }
                    n
                }
                other => bail!("{here}: unknown type {other:?}"),
            };
            max = max.max(n);
        }
        Ok(max)
    }
}

fn string_bytes(o: &serde_json::Map<String, Value>, here: &str) -> Result<usize> {
    let fixed = match o.get("format").and_then(Value::as_str) {
        Some("date") => Some(10),
        Some("time") => Some(21),
        Some("date-time") => Some(35),
        _ => None,
    };
    let chars = match (o.get("maxLength").and_then(Value::as_u64), fixed) {
        (Some(n), _) => n as usize,
        (None, Some(n)) => n,
        (None, None) => bail!("{here}: a string needs `maxLength` (or an enum, const or date format)"),
    };
    // Quotes, and at most 4 bytes per character (UTF-8; the allowed escapes take 2).
    Ok(2 + 4 * chars)
}

fn number_bytes(o: &serde_json::Map<String, Value>, t: &str, here: &str) -> Result<usize> {
    let lo = o.get("minimum").or(o.get("exclusiveMinimum")).and_then(Value::as_f64);
    let hi = o.get("maximum").or(o.get("exclusiveMaximum")).and_then(Value::as_f64);
    let (Some(lo), Some(hi)) = (lo, hi) else {
        bail!(
            "{here}: a{} {t} needs `minimum` and `maximum` (digits are otherwise unbounded)",
            if t == "integer" { "n" } else { "" }
        )
    };
    let int_digits = |x: f64| format!("{:.0}", x.abs().trunc()).len() + usize::from(x < 0.0);
    let int = int_digits(lo).max(int_digits(hi));
    if t == "integer" {
        return Ok(int);
    }
    let step = o
        .get("multipleOf")
        .and_then(Value::as_f64)
        .filter(|s| *s > 0.0)
        .ok_or_else(|| anyhow!("{here}: a number needs `multipleOf` (e.g. 0.01) to bound its decimals, or use an integer"))?;
    // Decimals of the step: 0.01 → 2. Trailing zeros beyond them are still multiples, so the
    // grammar is asked for them explicitly below in `Constraint`; here they bound the length.
    let decimals =
        (0..10).find(|d| ((step * 10f64.powi(*d)).round() - step * 10f64.powi(*d)).abs() < 1e-9).unwrap_or(10) as usize;
    Ok(int + if decimals > 0 { 1 + decimals } else { 0 })
}

/// The Qwen3.5 vocabulary as llguidance sees it: a trie of every token's bytes (specials
/// prefixed with its marker byte), `<|im_end|>` as the end token.
pub struct Vocabulary {
    factory: ParserFactory,
}

struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        // llguidance tokenizes only grammar literals; they are UTF-8 text.
        self.tokenizer.encode(&String::from_utf8_lossy(s)).unwrap_or_default()
    }
}

impl Vocabulary {
    /// Builds the trie and llguidance's token-set slices for `tokenizer` (about a second for
    /// 248K tokens; done once per model).
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let n = tokenizer::SPECIAL_START as usize + tokenizer::SPECIALS.len();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let b = tokenizer.token_bytes(id);
                if id >= tokenizer::SPECIAL_START { [&[TokTrie::SPECIAL_TOKEN_MARKER][..], &b].concat() } else { b }
            })
            .collect();
        let info = TokRxInfo { tok_end_of_turn: Some(tokenizer::IM_END), ..TokRxInfo::new(n as u32, tokenizer::IM_END) };
        let env: TokEnv = Arc::new(Env { trie: TokTrie::from(&info, &words), tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).context("llguidance: cannot index the vocabulary")?;
        // Grammar problems surface as errors; llguidance's own logging stays quiet.
        factory.set_stderr_log_level(0);
        Ok(Self { factory })
    }

    /// A fresh constraint for one generation.
    pub fn constraint(&self, schema: &Schema) -> Result<Constraint> {
        let m = Matcher::new(self.factory.create_parser(grammar(schema.value())));
        if let Some(e) = m.get_error() {
            bail!("llguidance: {e}");
        }
        Ok(Constraint { matcher: m, mask: None, mask_time: Duration::ZERO, steps: 0 })
    }
}

/// One generation's constraint: which tokens may come next.
pub struct Constraint {
    matcher: Matcher,
    /// The mask of the grammar's current state, computed once between two commits: the decode
    /// loop asks for the allowed tokens before the step (so the head computes only those) and
    /// masks the step's logits with the same set.
    mask: Option<toktrie::SimpleVob>,
    /// Time spent computing masks.
    pub mask_time: Duration,
    /// Masks computed.
    pub steps: usize,
}

impl Constraint {
    fn mask(&mut self) -> Result<&toktrie::SimpleVob> {
        if self.mask.is_none() {
            let t = Instant::now();
            self.mask = Some(self.matcher.compute_mask_or_eos().map_err(|e| anyhow!("llguidance: {e}"))?);
            self.mask_time += t.elapsed();
            self.steps += 1;
        }
        Ok(self.mask.as_ref().expect("computed above"))
    }

    /// Sets the logits of every token the grammar does not allow now to −∞ (the end token is
    /// allowed exactly when the output is complete; padding rows past the vocabulary never).
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask = self.mask()?;
        let n = mask.len();
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= n || !mask.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// The tokens the grammar allows now, ascending, into `out`.
    pub fn allowed(&mut self, out: &mut Vec<u32>) -> Result<()> {
        out.clear();
        self.mask()?.iter_set_entries(|i| out.push(i as u32));
        Ok(())
    }

    /// Advances the grammar by the chosen token.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| anyhow!("llguidance: {e}"))
    }

    /// The output so far is a complete value.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(schema: Value) -> String {
        format!("{:#}", Schema::new(schema).unwrap_err())
    }

    #[test]
    fn unbounded_and_unsupported_parts_are_named() {
        assert!(err(json!({"type": "string"})).contains("maxLength"));
        let e =
            err(json!({"type": "object", "properties": {"a": {"type": "number", "minimum": 0}}, "additionalProperties": false}));
        assert!(e.contains("/properties/a") && e.contains("maximum"), "{e}");
        assert!(err(json!({"type": "object", "properties": {}})).contains("additionalProperties"));
        assert!(err(json!({"type": "array", "items": {"type": "boolean"}})).contains("maxItems"));
        let e = err(json!({"type": "string", "maxLength": 5, "uniqueItems": true}));
        assert!(e.contains("uniqueItems"), "unsupported keyword reported: {e}");
        let e =
            err(json!({"$defs": {"n": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}));
        assert!(e.contains("recursive"), "{e}");
    }

    #[test]
    fn the_bound_covers_the_longest_output() {
        let s = Schema::new(json!({
            "type": "object", "additionalProperties": false, "required": ["a", "b"],
            "properties": {
                "a": {"type": "string", "maxLength": 3},
                "b": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": -5, "maximum": 100}},
                "c": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
                "d": {"enum": ["yes", "no"]},
                "e": {"type": ["string", "null"], "format": "date"}
            }
        }))
        .unwrap();
        let longest = r#"{"a":"ééé","b":[100,100],"c":1000.00,"d":"yes","e":"2024-01-31"}"#;
        assert!(s.max_tokens() >= longest.len(), "{} < {}", s.max_tokens(), longest.len());
        s.validate(&serde_json::from_str(longest).unwrap()).unwrap();
        assert!(s.validate(&json!({"a": "toolong", "b": []})).is_err());
    }

    /// `multipleOf` is a decimal rule: 8.04 is 804 hundredths although neither 8.04 nor 0.01 is
    /// exact in binary (the validator once rejected it, and with it a contract's extraction that
    /// the constraint had rightly allowed: benches/RESULTS.md, "The int4 comparison stopped by a
    /// validator bug").
    #[test]
    fn decimal_multiples_validate_as_decimals() {
        let s = Schema::new(json!({"type": "number", "minimum": 0, "maximum": 10000000, "multipleOf": 0.01})).unwrap();
        for ok in ["8.04", "0.07", "19.99", "1070468.14", "4.1", "3", "0"] {
            s.validate(&serde_json::from_str(ok).unwrap()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["8.045", "0.001", "1070468.145"] {
            assert!(s.validate(&serde_json::from_str(bad).unwrap()).is_err(), "{bad}");
        }
    }
}
