//! Merging what an `extract` stage found in each chunk of a long document into one object of
//! the same schema, with the chunk and pages every value came from.
//!
//! The rules follow what contract fields are: lists (parties, obligations, risks) gather across
//! the document, so arrays are concatenated in document order, de-duplicated and cut to
//! `maxItems`; a scalar (a date, a governing law) is stated once, usually early, so the first
//! non-empty value in document order wins and the provenance counts the other values seen.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

/// Where a value of the merged output came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// Chunk index (0-based, as in the result's `chunks`).
    pub chunk: usize,
    /// First and last page of that chunk.
    pub pages: [u32; 2],
    /// Other, different non-empty values other chunks gave for the same field.
    #[serde(skip_serializing_if = "is_zero")]
    pub others: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One chunk's extraction.
pub struct Part<'a> {
    /// The chunk's output (valid against the schema).
    pub value: &'a Value,
    /// Chunk index.
    pub chunk: usize,
    /// Pages of the chunk.
    pub pages: [u32; 2],
}

/// The merged object and the origin of every scalar and array item, by JSON pointer.
pub fn merge(schema: &Value, parts: &[Part]) -> (Value, BTreeMap<String, Origin>) {
    let mut prov = BTreeMap::new();
    let vals: Vec<(&Value, usize)> = parts.iter().enumerate().map(|(i, p)| (p.value, i)).collect();
    let v = Merger { root: schema, parts, prov: &mut prov }.node(Some(schema), &vals, "");
    (v, prov)
}

struct Merger<'a, 'p> {
    root: &'a Value,
    parts: &'a [Part<'p>],
    prov: &'a mut BTreeMap<String, Origin>,
}

fn is_empty(v: &Value) -> bool {
    matches!(v, Value::Null) || v.as_str().is_some_and(|s| s.trim().is_empty())
}

impl<'a> Merger<'a, '_> {
    fn origin(&self, part: usize, others: usize) -> Origin {
        let p = &self.parts[part];
        Origin { chunk: p.chunk, pages: p.pages, others }
    }

    /// The schema node with local `$ref`s followed.
    fn resolve(&self, mut s: &'a Value) -> &'a Value {
        for _ in 0..32 {
            match s.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')).and_then(|p| self.root.pointer(p)) {
                Some(t) => s = t,
                None => break,
            }
        }
        s
    }

    /// The node and its anyOf/oneOf branches, resolved.
    fn alternatives(&self, s: &'a Value) -> Vec<&'a Value> {
        let s = self.resolve(s);
        let mut out = vec![s];
        for key in ["anyOf", "oneOf"] {
            for b in s.get(key).and_then(Value::as_array).into_iter().flatten() {
                out.push(self.resolve(b));
            }
        }
        out
    }

    fn property(&self, s: Option<&'a Value>, key: &str) -> Option<&'a Value> {
        s.and_then(|s| self.alternatives(s).into_iter().find_map(|a| a.get("properties").and_then(|p| p.get(key))))
    }

    fn max_items(&self, s: Option<&'a Value>) -> Option<usize> {
        s.and_then(|s| self.alternatives(s).into_iter().filter_map(|a| a.get("maxItems")?.as_u64()).min()).map(|n| n as usize)
    }

    fn node(&mut self, schema: Option<&'a Value>, vals: &[(&Value, usize)], at: &str) -> Value {
        let present: Vec<(&Value, usize)> = vals.iter().copied().filter(|(v, _)| !is_empty(v)).collect();
        if !present.is_empty() && present.iter().all(|(v, _)| v.is_object()) {
            let mut keys: Vec<String> = Vec::new();
            for (v, _) in &present {
                for k in v.as_object().into_iter().flat_map(Map::keys) {
                    if !keys.contains(k) {
                        keys.push(k.clone());
                    }
                }
            }
            let mut out = Map::new();
            for k in keys {
                let sub: Vec<(&Value, usize)> = present.iter().filter_map(|(v, i)| v.get(&k).map(|x| (x, *i))).collect();
                let merged = self.node(self.property(schema, &k), &sub, &format!("{at}/{}", escape(&k)));
                out.insert(k, merged);
            }
            return Value::Object(out);
        }
        if !present.is_empty() && present.iter().all(|(v, _)| v.is_array()) {
            let cap = self.max_items(schema).unwrap_or(usize::MAX);
            let mut items: Vec<Value> = Vec::new();
            let mut seen: Vec<String> = Vec::new();
            for (v, i) in &present {
                for item in v.as_array().into_iter().flatten() {
                    let key = canonical(item);
                    if items.len() < cap && !seen.contains(&key) {
                        self.prov.insert(format!("{at}/{}", items.len()), self.origin(*i, 0));
                        seen.push(key);
                        items.push(item.clone());
                    }
                }
            }
            return Value::Array(items);
        }
        match present.first() {
            Some((v, i)) => {
                let mut distinct: Vec<String> = present.iter().map(|(v, _)| canonical(v)).collect();
                distinct.sort();
                distinct.dedup();
                self.prov.insert(at.to_string(), self.origin(*i, distinct.len() - 1));
                (*v).clone()
            }
            // Every chunk left it empty: keep what the first said (null or "").
            None => vals.first().map(|(v, _)| (*v).clone()).unwrap_or(Value::Null),
        }
    }
}

/// A comparison key: case, spacing and key order do not make two values different.
fn canonical(v: &Value) -> String {
    match v {
        Value::String(s) => s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase(),
        Value::Object(m) => {
            let sorted: BTreeMap<&String, String> = m.iter().map(|(k, v)| (k, canonical(v))).collect();
            format!("{sorted:?}")
        }
        Value::Array(a) => format!("{:?}", a.iter().map(canonical).collect::<Vec<_>>()),
        other => other.to_string(),
    }
}

/// JSON pointer escaping of a key.
fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_gather_scalars_come_from_the_first_chunk_that_has_them() {
        let schema = json!({
            "type": "object", "additionalProperties": false,
            "properties": {
                "governing_law": {"type": ["string", "null"], "maxLength": 50},
                "parties": {"type": "array", "maxItems": 3, "items": {"$ref": "#/$defs/party"}},
                "term": {"type": "object", "additionalProperties": false,
                         "properties": {"months": {"type": ["integer", "null"], "minimum": 0, "maximum": 999}}}
            },
            "$defs": {"party": {"type": "object", "additionalProperties": false,
                                "properties": {"name": {"type": "string", "maxLength": 50}}}}
        });
        let a = json!({"governing_law": null, "parties": [{"name": "Acme Corp"}], "term": {"months": null}});
        let b =
            json!({"governing_law": "New York", "parties": [{"name": "acme  corp"}, {"name": "Beta"}], "term": {"months": 24}});
        let c = json!({"governing_law": "Delaware", "parties": [{"name": "Gamma"}, {"name": "Delta"}], "term": {"months": 24}});
        let parts = [
            Part { value: &a, chunk: 0, pages: [1, 4] },
            Part { value: &b, chunk: 1, pages: [4, 9] },
            Part { value: &c, chunk: 2, pages: [9, 12] },
        ];
        let (v, prov) = merge(&schema, &parts);
        assert_eq!(v["governing_law"], "New York");
        assert_eq!(prov["/governing_law"], Origin { chunk: 1, pages: [4, 9], others: 1 });
        // "acme  corp" is Acme Corp again; maxItems 3 cuts Delta.
        assert_eq!(v["parties"], json!([{"name": "Acme Corp"}, {"name": "Beta"}, {"name": "Gamma"}]));
        assert_eq!(prov["/parties/2"].chunk, 2);
        assert_eq!(v["term"]["months"], 24);
        assert_eq!(prov["/term/months"], Origin { chunk: 1, pages: [4, 9], others: 0 });
    }
}
