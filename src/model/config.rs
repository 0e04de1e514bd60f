//! Qwen3.5 text configuration: read from a Hugging Face `config.json` and the shape presets of
//! docs/model.md, "Shapes".

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The text decoder's hyper-parameters, everything the graph depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Rows of the embedding and lm_head (248,320 for Qwen3.5, padded beyond the 248,077 real tokens).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Decoder layers (DeltaNet and attention together).
    pub num_hidden_layers: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Query heads of the attention layers.
    pub num_attention_heads: usize,
    /// Key/value heads of the attention layers (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Query/key heads of the DeltaNet layers.
    pub linear_num_key_heads: usize,
    /// Value heads (and recurrent states) of the DeltaNet layers.
    pub linear_num_value_heads: usize,
    /// Width of a DeltaNet query/key head.
    pub linear_key_head_dim: usize,
    /// Width of a DeltaNet value head.
    pub linear_value_head_dim: usize,
    /// Taps of the causal depthwise conv before the DeltaNet rule.
    pub linear_conv_kernel_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Fraction of each attention head that is rotated.
    pub partial_rotary_factor: f64,
    /// Rotary frequencies per axis (T, H, W), interleaved.
    pub mrope_section: Vec<usize>,
    /// Whether lm_head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// Longest context the model supports, in tokens.
    pub max_position_embeddings: usize,
    /// `"linear_attention"` or `"full_attention"` per layer.
    pub layer_types: Vec<String>,
}

/// One axis of a carried state, after the batch axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateDim {
    /// The tokens seen so far (an attention cache's rows).
    Past,
    /// A size fixed by the configuration.
    Fixed(usize),
}

/// A state a layer carries between decoder calls: its graph input name (`past.<layer>.<what>`)
/// and its axes after the batch axis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerState {
    /// Graph input name; the matching output is `present.<layer>.<what>`.
    pub name: String,
    /// Axes after the batch axis.
    pub dims: Vec<StateDim>,
}

impl LayerState {
    /// Elements of a state with no context axis (`None` for a cache that grows with the context).
    pub fn fixed_elements(&self) -> Option<usize> {
        self.dims.iter().map(|d| if let StateDim::Fixed(n) = d { Some(*n) } else { None }).product()
    }

    /// Elements each context token adds to a state that grows with the context (`None` for a
    /// fixed-size state).
    pub fn elements_per_token(&self) -> Option<usize> {
        self.dims.contains(&StateDim::Past).then(|| self.shape(1).iter().product())
    }

    /// The shape with `past` tokens on the context axis and a batch of one.
    pub fn shape(&self, past: usize) -> Vec<usize> {
        std::iter::once(1).chain(self.dims.iter().map(|d| if let StateDim::Fixed(n) = d { *n } else { past })).collect()
    }
}

/// Kind of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Gated DeltaNet.
    Linear,
    /// Gated full attention.
    Full,
}

impl TextConfig {
    /// Kind of layer `i`.
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        if self.layer_types[i] == "full_attention" { LayerKind::Full } else { LayerKind::Linear }
    }

    /// Width of all DeltaNet query (or key) heads together.
    pub fn key_dim(&self) -> usize {
        self.linear_num_key_heads * self.linear_key_head_dim
    }

    /// Width of all DeltaNet value heads together.
    pub fn value_dim(&self) -> usize {
        self.linear_num_value_heads * self.linear_value_head_dim
    }

    /// Channels of the DeltaNet conv: queries, keys and values.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// Rotated dimensions per attention head.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor).round() as usize
    }

    /// Layers of each kind, in order.
    pub fn layers_of(&self, kind: LayerKind) -> Vec<usize> {
        (0..self.num_hidden_layers).filter(|&i| self.layer_kind(i) == kind).collect()
    }

    /// The two states layer `i` carries from one decoder call to the next, in graph input
    /// order: an attention layer's keys and values (growing along the context), a DeltaNet
    /// layer's conv window and recurrent state (fixed size). The graph's inputs, the decoder's
    /// empty state and the memory plan all derive from this one place.
    pub fn layer_states(&self, i: usize) -> [LayerState; 2] {
        match self.layer_kind(i) {
            LayerKind::Full => {
                let dims = vec![StateDim::Past, StateDim::Fixed(self.num_key_value_heads), StateDim::Fixed(self.head_dim)];
                [
                    LayerState { name: format!("past.{i}.key"), dims: dims.clone() },
                    LayerState { name: format!("past.{i}.value"), dims },
                ]
            }
            LayerKind::Linear => [
                LayerState {
                    name: format!("past.{i}.conv"),
                    dims: vec![StateDim::Fixed(self.conv_dim()), StateDim::Fixed(self.linear_conv_kernel_dim - 1)],
                },
                LayerState {
                    name: format!("past.{i}.recurrent"),
                    dims: [self.linear_num_value_heads, self.linear_key_head_dim, self.linear_value_head_dim]
                        .map(StateDim::Fixed)
                        .to_vec(),
                },
            ],
        }
    }

    /// Bytes of carried DeltaNet state (f32 conv + recurrent), independent of context length.
    pub fn linear_state_bytes(&self) -> usize {
        let elements: usize = self
            .layers_of(LayerKind::Linear)
            .into_iter()
            .flat_map(|i| self.layer_states(i))
            .filter_map(|s| s.fixed_elements())
            .sum();
        elements * 4
    }

    /// KV cache elements per context token (attention layers only).
    pub fn kv_elements_per_token(&self) -> usize {
        (0..self.num_hidden_layers).flat_map(|i| self.layer_states(i)).filter_map(|s| s.elements_per_token()).sum()
    }

    /// Checks the invariants the graph relies on; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.layer_types.len() != c.num_hidden_layers {
            bail!("layer_types has {} entries but num_hidden_layers is {}", c.layer_types.len(), c.num_hidden_layers);
        }
        if let Some(t) = c.layer_types.iter().find(|t| *t != "full_attention" && *t != "linear_attention") {
            bail!("layer_types: unknown layer type {t:?} (expected full_attention or linear_attention)");
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if !c.linear_num_value_heads.is_multiple_of(c.linear_num_key_heads) {
            bail!(
                "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                c.linear_num_value_heads,
                c.linear_num_key_heads
            );
        }
        let rot = c.rotary_dim();
        if !rot.is_multiple_of(2) || rot > c.head_dim {
            bail!(
                "partial_rotary_factor {} gives an invalid rotary dim {rot} for head_dim {}",
                c.partial_rotary_factor,
                c.head_dim
            );
        }
        if c.mrope_section.iter().sum::<usize>() != rot / 2 {
            bail!("mrope_section {:?} must sum to rotary_dim/2 = {}", c.mrope_section, rot / 2);
        }
        if c.linear_conv_kernel_dim < 2 || c.linear_conv_kernel_dim > deltadoc_kernels::conv::MAX_KERNEL {
            bail!(
                "linear_conv_kernel_dim {} is out of range 2..={}",
                c.linear_conv_kernel_dim,
                deltadoc_kernels::conv::MAX_KERNEL
            );
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`: `qwen3_5` (nested `text_config`) or `qwen3_5_text`.
    pub fn from_hf_json(path: &Path) -> Result<(Self, String)> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("").to_string();
        let (tc, top) = match model_type.as_str() {
            "qwen3_5" => (
                v.get("text_config")
                    .cloned()
                    .with_context(|| format!("{}: qwen3_5 config without text_config", path.display()))?,
                &v,
            ),
            "qwen3_5_text" => (v.clone(), &v),
            other => bail!("{}: model_type {other:?} is not a Qwen3.5 model (expected qwen3_5 or qwen3_5_text)", path.display()),
        };
        let cfg = Self::from_text_json(&tc, top).with_context(|| format!("{}: invalid Qwen3.5 text config", path.display()))?;
        Ok((cfg, model_type))
    }

    fn from_text_json(tc: &serde_json::Value, top: &serde_json::Value) -> Result<Self> {
        refuse_unimplemented(tc)?;
        let num = |k: &str| -> Result<usize> {
            tc.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).with_context(|| format!("field {k} missing or not an integer"))
        };
        let num_or = |k: &str, d: usize| tc.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(d);
        let float_or = |k: &str, d: f64| tc.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let rope = tc.get("rope_parameters").or_else(|| tc.get("rope_scaling"));
        let rope_get = |k: &str| rope.and_then(|r| r.get(k)).or_else(|| tc.get(k));
        let num_layers = num("num_hidden_layers")?;
        let interval = num_or("full_attention_interval", 4);
        let layer_types = match tc.get("layer_types").and_then(|x| x.as_array()) {
            Some(a) => a.iter().map(|x| x.as_str().unwrap_or("").to_string()).collect(),
            None => (0..num_layers)
                .map(|i| if (i + 1) % interval == 0 { "full_attention" } else { "linear_attention" }.to_string())
                .collect(),
        };
        let tie =
            tc.get("tie_word_embeddings").or_else(|| top.get("tie_word_embeddings")).and_then(|x| x.as_bool()).unwrap_or(false);
        let cfg = TextConfig {
            vocab_size: num("vocab_size")?,
            hidden_size: num("hidden_size")?,
            num_hidden_layers: num_layers,
            intermediate_size: num("intermediate_size")?,
            num_attention_heads: num("num_attention_heads")?,
            num_key_value_heads: num("num_key_value_heads")?,
            head_dim: num_or("head_dim", 256),
            linear_num_key_heads: num("linear_num_key_heads")?,
            linear_num_value_heads: num("linear_num_value_heads")?,
            linear_key_head_dim: num_or("linear_key_head_dim", 128),
            linear_value_head_dim: num_or("linear_value_head_dim", 128),
            linear_conv_kernel_dim: num_or("linear_conv_kernel_dim", 4),
            rms_norm_eps: float_or("rms_norm_eps", 1e-6),
            rope_theta: rope_get("rope_theta").and_then(|x| x.as_f64()).unwrap_or(10_000_000.0),
            partial_rotary_factor: rope_get("partial_rotary_factor").and_then(|x| x.as_f64()).unwrap_or(0.25),
            mrope_section: rope_get("mrope_section")
                .and_then(|x| x.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
                .unwrap_or_else(|| vec![11, 11, 10]),
            tie_word_embeddings: tie,
            max_position_embeddings: num_or("max_position_embeddings", 262_144),
            layer_types,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `text_config` object of a Hugging Face `config.json` for this configuration.
    pub fn to_hf_text_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "qwen3_5_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": false,
            "attn_output_gate": true,
            "full_attention_interval": 4,
            "layer_types": self.layer_types,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
                "mrope_section": self.mrope_section,
                "mrope_interleaved": true
            },
            "eos_token_id": 248044,
            "pad_token_id": 248044,
            "bos_token_id": 248044,
            "dtype": "float32"
        })
    }
}

/// Stops the import at a config key whose value asks for a computation this runtime does not
/// implement: importing it anyway would give a model that silently computes something else.
/// Keys that only matter to training, to speculative decoding (the MTP head, whose tensors are
/// skipped) or to what transformers ignores (`mrope_interleaved`: it always interleaves) pass.
fn refuse_unimplemented(tc: &serde_json::Value) -> Result<()> {
    use serde_json::Value;
    let refuse = |key: &str, v: &Value, implemented: &str| -> Result<()> {
        bail!("config key {key} = {v} is not implemented by this importer ({implemented}); it would compute something else")
    };
    let expect = |key: &str, ok: &[Value], implemented: &str| -> Result<()> {
        match tc.get(key) {
            Some(v) if !v.is_null() && !ok.contains(v) => refuse(key, v, implemented),
            _ => Ok(()),
        }
    };
    expect("hidden_act", &["silu".into()], "the MLP activation is SiLU")?;
    expect("attention_bias", &[false.into()], "attention projections have no bias")?;
    expect("attn_output_gate", &[true.into()], "attention output is gated")?;
    expect("use_sliding_window", &[false.into()], "attention is global")?;
    expect("sliding_window", &[], "attention is global")?;
    expect("mlp_only_layers", &[Value::Array(Vec::new())], "every layer has its dense MLP")?;
    expect("num_experts", &[0.into()], "dense MLPs, not mixture-of-experts")?;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(rope) = tc.get(key).filter(|r| !r.is_null()) else { continue };
        let kind = rope.get("rope_type").or_else(|| rope.get("type")).filter(|t| !t.is_null());
        if let Some(kind) = kind.filter(|k| k.as_str() != Some("default")) {
            refuse(&format!("{key}.rope_type"), kind, "only the default rotary embedding; YaRN is not implemented yet")?;
        }
    }
    Ok(())
}

/// Named shapes for `model synth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// 4 layers (3 DeltaNet + 1 attention) with the full 248,320-token vocabulary, tiny widths.
    Tiny,
    /// The 0.8B configuration.
    #[value(name = "0.8b")]
    B0_8,
    /// The 2B configuration.
    #[value(name = "2b")]
    B2,
    /// The 4B configuration.
    #[value(name = "4b")]
    B4,
    /// The 9B configuration.
    #[value(name = "9b")]
    B9,
}

impl Shape {
    /// The configuration of this shape (docs/model.md, "Shapes").
    pub fn config(self) -> TextConfig {
        // (hidden, layers, intermediate, heads, kv heads, head_dim, k heads, v heads, k dim, v dim, tie)
        let (h, l, i, nq, nkv, hd, hk, hv, dk, dv, tie) = match self {
            Shape::Tiny => (64, 4, 128, 4, 2, 32, 2, 4, 16, 16, true),
            Shape::B0_8 => (1024, 24, 3584, 8, 2, 256, 16, 16, 128, 128, true),
            Shape::B2 => (2048, 24, 6144, 8, 2, 256, 16, 16, 128, 128, true),
            Shape::B4 => (2560, 32, 9216, 16, 4, 256, 16, 32, 128, 128, true),
            Shape::B9 => (4096, 32, 12288, 16, 4, 256, 16, 32, 128, 128, false),
        };
        // Tiny keeps the real rotary layout (a quarter of the head, three interleaved sections).
        let mrope_section = if hd == 256 { vec![11, 11, 10] } else { vec![2, 1, 1] };
        TextConfig {
            vocab_size: 248_320,
            hidden_size: h,
            num_hidden_layers: l,
            intermediate_size: i,
            num_attention_heads: nq,
            num_key_value_heads: nkv,
            head_dim: hd,
            linear_num_key_heads: hk,
            linear_num_value_heads: hv,
            linear_key_head_dim: dk,
            linear_value_head_dim: dv,
            linear_conv_kernel_dim: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000_000.0,
            partial_rotary_factor: 0.25,
            mrope_section,
            tie_word_embeddings: tie,
            max_position_embeddings: 262_144,
            layer_types: (0..l)
                .map(|i| if (i + 1) % 4 == 0 { "full_attention" } else { "linear_attention" }.to_string())
                .collect(),
        }
    }

    /// Name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny",
            Shape::B0_8 => "0.8b",
            Shape::B2 => "2b",
            Shape::B4 => "4b",
            Shape::B9 => "9b",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_have_the_hybrid_pattern() {
        for s in [Shape::Tiny, Shape::B0_8, Shape::B2, Shape::B4, Shape::B9] {
            let c = s.config();
            c.validate().unwrap();
            assert_eq!(c.layers_of(LayerKind::Full).len() * 4, c.num_hidden_layers);
            assert_eq!(c.layer_kind(3), LayerKind::Full);
            assert_eq!(c.layer_kind(0), LayerKind::Linear);
        }
        assert_eq!(Shape::B0_8.config().conv_dim(), 6144);
        assert_eq!(Shape::B9.config().conv_dim(), 8192);
        assert_eq!(Shape::B0_8.config().rotary_dim(), 64);
        // docs/model.md, "State and memory": 18 × 16 × 128 × 128 × 4 recurrent bytes plus 3 conv columns of 6144
        // channels per layer; 6 layers × 2 × 2 × 256 KV values per token.
        assert_eq!(Shape::B0_8.config().linear_state_bytes(), 18_874_368 + 18 * 6144 * 3 * 4);
        assert_eq!(Shape::B0_8.config().kv_elements_per_token(), 6 * 2 * 2 * 256);
    }

    #[test]
    fn each_unimplemented_config_key_stops_the_import_naming_it() {
        let base = Shape::Tiny.config().to_hf_text_json();
        let cases: [(&str, serde_json::Value, &str); 10] = [
            ("hidden_act", "gelu".into(), "hidden_act = \"gelu\""),
            ("attention_bias", true.into(), "attention_bias = true"),
            ("attn_output_gate", false.into(), "attn_output_gate = false"),
            ("use_sliding_window", true.into(), "use_sliding_window = true"),
            ("sliding_window", 4096.into(), "sliding_window = 4096"),
            ("mlp_only_layers", serde_json::json!([0]), "mlp_only_layers = [0]"),
            ("num_experts", 64.into(), "num_experts = 64"),
            ("rope_parameters", serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "rope_parameters.rope_type = \"yarn\""),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "linear", "factor": 2.0}),
                "rope_parameters.rope_type = \"linear\"",
            ),
            ("rope_scaling", serde_json::json!({"type": "dynamic", "factor": 2.0}), "rope_scaling.rope_type = \"dynamic\""),
        ];
        for (key, value, said) in cases {
            let mut tc = base.clone();
            if key == "rope_scaling" {
                tc.as_object_mut().unwrap().remove("rope_parameters");
            }
            tc[key] = value;
            let e = format!("{:#}", TextConfig::from_text_json(&tc, &tc).unwrap_err());
            assert!(e.contains(said) && e.contains("not implemented"), "{key}: {e}");
        }
        // What the runtime implements, and keys that do not change the computation, pass.
        let mut tc = base.clone();
        for (key, value) in
            [("sliding_window", serde_json::Value::Null), ("mtp_num_hidden_layers", 1.into()), ("num_experts", 0.into())]
        {
            tc[key] = value;
        }
        tc["rope_parameters"]["mrope_interleaved"] = false.into();
        TextConfig::from_text_json(&tc, &tc).unwrap();
    }

    #[test]
    fn hf_json_round_trip() {
        let c = Shape::B4.config();
        let dir = std::env::temp_dir().join(format!("deltadoc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        let nested =
            serde_json::json!({"model_type": "qwen3_5", "text_config": c.to_hf_text_json(), "tie_word_embeddings": true});
        std::fs::write(&p, nested.to_string()).unwrap();
        let (back, mt) = TextConfig::from_hf_json(&p).unwrap();
        assert_eq!(mt, "qwen3_5");
        assert_eq!(back, c);
        std::fs::write(&p, r#"{"model_type":"llama"}"#).unwrap();
        let e = TextConfig::from_hf_json(&p).unwrap_err().to_string();
        assert!(e.contains("not a Qwen3.5 model"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
