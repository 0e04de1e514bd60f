//! The Qwen3.5 text decoder as one ONNX graph (docs/model.md, "Decoder" to "Positions"): the one place where the
//! architecture is written down for the runtime.
//!
//! Interface (batch is symbolic: one sequence per row, [`crate::generate::Batch`] decodes several):
//! - inputs: `input_ids [B,S] i64`, `position_ids [3,B,S] i64` (T/H/W rows; equal for text),
//!   `past_lengths [B] i64` (each row's tokens in the attention caches, at most `P`),
//!   `logits_index [N] i64` (positions of this call whose logits are wanted), `image_embeds
//!   [M,H] f32` (vision features for this call's M `<|image_pad|>` tokens, in order), for int8/int4
//!   `head_rows [R] i64` (the only vocabulary rows whose logits are computed, the rest −∞; empty:
//!   all), and per layer i either `past.i.key`/`past.i.value [B,P,nkv,hd]` (attention, f32, f16 or bf16 per [`KvCache`];
//!   position-major; row b's first `past_lengths[b]` positions are its sequence's) or `past.i.conv [B,conv_dim,K−1]` and `past.i.recurrent [B,Hv,Dk,Dv]`
//!   (DeltaNet, f32);
//! - outputs: `logits [B,N,V]`, `present.i.conv`/`present.i.recurrent` (the DeltaNet states after
//!   the call, same layouts) and `present.i.key`/`present.i.value [B,S,nkv,hd]`: only this call's
//!   rows, which the caller appends to its cache (the attention op never copies the cache).

use anyhow::{Result, anyhow};

use super::config::{LayerKind, LayerState, StateDim, TextConfig};
use super::quant::{self, Precision};
use super::state::Elem;
use crate::onnx::proto::data_type;
use crate::onnx::{Attr, Dim, GraphBuilder};
use crate::ops;
use crate::ops::quant_matmul::{PANEL_ROWS, Weights};

/// Where the DeltaNet layers' conv and rule run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearAttn {
    /// deltadoc's own `ai.deltadoc` operators (chunked prefill kernel).
    Deltadoc,
    /// ONNX Runtime's built-in `com.microsoft` LinearAttention / CausalConvWithState.
    Builtin,
}

/// Element type of the attention layers' KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCache {
    /// Exact: what the parity tests against the reference use. Model folders written before the
    /// choice existed have it.
    #[default]
    F32,
    /// Half the bytes (a 262,144-token context of the 0.8B shape: 3.2 GB instead of 6.4 GB);
    /// the logit error it adds is measured in benches/RESULTS.md.
    F16,
    /// Half the bytes like f16, and on CPUs with AVX512_BF16 (AMD Zen 4+, Intel Cooper Lake and
    /// Sapphire Rapids+) attention computes in bf16 at about twice the f32 rate, what makes long
    /// contexts prefill faster; 3 fewer significant bits than f16 (logit error in
    /// benches/RESULTS.md). Elsewhere it is widened to f32 like f16.
    Bf16,
}

impl KvCache {
    /// The cache's element type.
    pub fn elem(self) -> Elem {
        match self {
            Self::F32 => Elem::F32,
            Self::F16 => Elem::F16,
            Self::Bf16 => Elem::Bf16,
        }
    }

    fn data_type(self) -> i32 {
        match self {
            Self::F32 => data_type::FLOAT,
            Self::F16 => data_type::FLOAT16,
            Self::Bf16 => data_type::BFLOAT16,
        }
    }

    fn op(self) -> &'static str {
        match self {
            Self::F32 => <f32 as ops::CacheType>::OP,
            Self::F16 => <half::f16 as ops::CacheType>::OP,
            Self::Bf16 => <half::bf16 as ops::CacheType>::OP,
        }
    }
}

/// Supplies weights by checkpoint name (without the `model.language_model.` prefix) and checks
/// their shape; the importer reads safetensors, `model synth` draws random numbers.
pub trait WeightSource {
    /// The tensor as f32, row-major, of exactly `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

/// Graph options beyond the model configuration.
#[derive(Clone, Copy, Debug)]
pub struct GraphOptions {
    /// Storage precision of the projection weights.
    pub precision: Precision,
    /// Block length along K of int8/int4 weights ([`ExportOptions::block`]); `None` for float
    /// precisions.
    ///
    /// [`ExportOptions::block`]: super::ExportOptions::block
    pub quant_block: Option<usize>,
    /// Which operators run the DeltaNet layers.
    pub linear_attn: LinearAttn,
    /// Element type of the KV cache.
    pub kv_cache: KvCache,
    /// `<|image_pad|>`: positions holding it take the next row of `image_embeds`.
    pub image_token_id: u32,
}

struct Ctx<'a> {
    b: GraphBuilder,
    cfg: &'a TextConfig,
    opts: GraphOptions,
    cos: String,
    sin: String,
}

/// The output that carries the state input `past_name` to the next call: the whole next state
/// of a DeltaNet layer, or the rows an attention layer's cache grows by.
pub fn present_name(past_name: &str) -> String {
    past_name.replacen("past.", "present.", 1)
}

/// Graph input of the int8/int4 graphs: the head's rows to compute (i64, ascending, each below
/// the vocabulary; every other logit comes out −∞), empty for all of them.
pub const HEAD_ROWS: &str = "head_rows";

/// Input holding each batch row's cache length: the rows of a batch are sequences of their own.
pub const PAST_LENGTHS: &str = "past_lengths";

/// Whether the graph of `precision` takes [`HEAD_ROWS`]: the quantised heads run on deltadoc's
/// `QuantMatMul`, which can skip rows; a float head is one ONNX `Gemm`, which cannot.
pub fn head_takes_rows(precision: Precision) -> bool {
    matches!(precision, Precision::Int8 | Precision::Int4)
}

/// Writes the decoder graph into `builder`; progress is reported per layer through `on_layer`.
pub fn build(
    mut b: GraphBuilder,
    cfg: &TextConfig,
    w: &mut dyn WeightSource,
    opts: GraphOptions,
    on_layer: &mut dyn FnMut(usize),
) -> Result<GraphBuilder> {
    cfg.validate()?;
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let batch = Dim::Named("batch");
    b.input("input_ids", data_type::INT64, &[batch.clone(), Dim::Named("seq")]);
    b.input("position_ids", data_type::INT64, &[Dim::Fixed(3), batch.clone(), Dim::Named("seq")]);
    b.input(PAST_LENGTHS, data_type::INT64, std::slice::from_ref(&batch));
    b.input("logits_index", data_type::INT64, &[Dim::Named("n_logits")]);
    b.input("image_embeds", data_type::FLOAT, &[Dim::Named("image_rows"), Dim::Fixed(h as i64)]);
    if head_takes_rows(opts.precision) {
        b.input(HEAD_ROWS, data_type::INT64, &[Dim::Named(HEAD_ROWS)]);
    }
    for i in 0..cfg.num_hidden_layers {
        let ty = match cfg.layer_kind(i) {
            LayerKind::Full => opts.kv_cache.data_type(),
            LayerKind::Linear => data_type::FLOAT,
        };
        // An attention output holds the call's positions where its input holds the cache's.
        let dims = |state: &LayerState, context: &'static str| -> Vec<Dim> {
            std::iter::once(batch.clone())
                .chain(state.dims.iter().map(|d| match d {
                    StateDim::Past => Dim::Named(context),
                    StateDim::Fixed(n) => Dim::Fixed(*n as i64),
                }))
                .collect()
        };
        let states = cfg.layer_states(i);
        for s in &states {
            b.input(&s.name, ty, &dims(s, "past"));
        }
        for s in &states {
            b.output(&present_name(&s.name), ty, &dims(s, "seq"));
        }
    }
    b.output("logits", data_type::FLOAT, &[batch, Dim::Named("n_logits"), Dim::Fixed(v as i64)]);

    let mut c = Ctx { b, cfg, opts, cos: String::new(), sin: String::new() };
    c.rope_tables()?;

    // Embedding: kept unquantised (fp16 at most) because every row is read as-is.
    let embed = w.get("embed_tokens.weight", &[v, h])?;
    let embed_name = c.store_embedding(&embed)?;
    let x = c.gather_embedding(&embed_name)?;
    let mut x = c.scatter_image_rows(&x)?;

    // Each block is `x + block(RMSNorm(x))`: the norm goes to the block's first projection and
    // the residual to its last, which int8/int4 graphs fold into their `QuantMatMul` nodes.
    for i in 0..cfg.num_hidden_layers {
        let p = format!("layers.{i}.");
        let norm = c.norm_weight(&w.get(&format!("{p}input_layernorm.weight"), &[h])?, true)?;
        x = match cfg.layer_kind(i) {
            LayerKind::Full => c.attention(i, &x, &norm, w)?,
            LayerKind::Linear => c.delta_net(i, &x, &norm, w)?,
        };
        let norm = c.norm_weight(&w.get(&format!("{p}post_attention_layernorm.weight"), &[h])?, true)?;
        x = c.mlp(&p, &x, &norm, w)?;
        on_layer(i);
    }
    let norm = c.norm_weight(&w.get("norm.weight", &[h])?, true)?;
    let logits = if cfg.tie_word_embeddings {
        c.lm_head(&x, &norm, Some(&embed_name), embed)?
    } else {
        drop(embed);
        let head = w.get("lm_head.weight", &[v, h])?;
        c.lm_head(&x, &norm, None, head)?
    };
    c.b.node_named("Identity", "", &[&logits], &["logits"], vec![]);
    Ok(c.b)
}

/// A DeltaNet layer's gate inputs (graph names): `a`, `b` `[B, T, Hv]` from the input
/// projection, the heads' `−exp(A_log)` and `dt_bias` `[Hv]`, the output gate `z` `[B, T,
/// Hv·Dv]` and the gated RMSNorm's weight `[Dv]`.
struct Gates<'a> {
    a: &'a str,
    b: &'a str,
    neg_exp_a: &'a str,
    dt_bias: &'a str,
    z: &'a str,
    norm: &'a str,
}

impl Ctx<'_> {
    /// cos/sin tables `[B,S,1,rot]` for the interleaved multi-axis RoPE: rotary frequency i takes
    /// its position from axis i mod 3 (T, H, W), exactly as the reference's interleaved MRoPE.
    fn rope_tables(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let half = cfg.rotary_dim() / 2;
        // Selection matrix [3, half]: row a holds inv_freq[i] where axis(i) == a, else 0. Adding
        // exact zeros leaves pos·inv_freq bit-identical to the reference's product.
        let mut sel = vec![0f32; 3 * half];
        let axis_of = mrope_axes(&cfg.mrope_section);
        for i in 0..half {
            let inv = (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.rotary_dim() as f64)) as f32;
            sel[axis_of[i] * half + i] = inv;
        }
        let sel = self.b.f32s("rope.inv_freq_by_axis", &[3, half as i64], &sel)?;
        let pos = self.b.op("Cast", &["position_ids"], vec![("to", Attr::Int(data_type::FLOAT as i64))]);
        let pos = self.b.op("Transpose", &[&pos], vec![("perm", Attr::Ints(vec![1, 2, 0]))]);
        let freqs = self.b.op("MatMul", &[&pos, &sel], vec![]);
        let emb = self.b.op("Concat", &[&freqs, &freqs], vec![("axis", Attr::Int(-1))]);
        let axes = self.b.ints(&[2])?;
        let emb = self.b.op("Unsqueeze", &[&emb, &axes], vec![]);
        self.cos = self.b.op("Cos", &[&emb], vec![]);
        self.sin = self.b.op("Sin", &[&emb], vec![]);
        Ok(())
    }

    fn store_embedding(&mut self, table: &[f32]) -> Result<String> {
        let (v, h) = (self.cfg.vocab_size as i64, self.cfg.hidden_size as i64);
        let name = self.b.fresh("embed");
        match self.opts.precision {
            Precision::Fp32 => self.b.f32s(&name, &[v, h], table),
            _ => self.b.initializer(&name, data_type::FLOAT16, &[v, h], &quant::to_f16_bytes(table)),
        }
    }

    fn gather_embedding(&mut self, table: &str) -> Result<String> {
        let x = self.b.op("Gather", &[table, "input_ids"], vec![("axis", Attr::Int(0))]);
        Ok(self.cast_half_to_f32(x))
    }

    /// Replaces the embedding of the k-th `<|image_pad|>` of this call by row k of
    /// `image_embeds` (the reference's masked_scatter). Row 0 of the padded table is a dummy
    /// every other position points at, so a call without images passes zero rows.
    fn scatter_image_rows(&mut self, x: &str) -> Result<String> {
        let h = self.cfg.hidden_size as i64;
        let pad = self.b.i64s("image_token_id", &[], &[self.opts.image_token_id as i64])?;
        let is_pad = self.b.op("Equal", &["input_ids", &pad], vec![]);
        let as_int = self.b.op("Cast", &[&is_pad], vec![("to", Attr::Int(data_type::INT64 as i64))]);
        let axis = self.b.i64s("seq_axis", &[], &[1])?;
        let ordinal = self.b.op("CumSum", &[&as_int, &axis], vec![]);
        let row = self.b.op("Mul", &[&ordinal, &as_int], vec![]);
        let dummy = self.b.f32s("image_embeds.dummy", &[1, h], &vec![0.0; h as usize])?;
        let table = self.b.op("Concat", &[&dummy, "image_embeds"], vec![("axis", Attr::Int(0))]);
        let rows = self.b.op("Gather", &[&table, &row], vec![("axis", Attr::Int(0))]);
        let ax = self.b.ints(&[-1])?;
        let mask = self.b.op("Unsqueeze", &[&is_pad, &ax], vec![]);
        Ok(self.b.op("Where", &[&mask, &rows, x], vec![]))
    }

    fn cast_half_to_f32(&mut self, x: String) -> String {
        if self.opts.precision == Precision::Fp32 {
            x
        } else {
            self.b.op("Cast", &[&x], vec![("to", Attr::Int(data_type::FLOAT as i64))])
        }
    }

    /// `logits = RMSNorm(x) · tableᵀ` at the positions `logits_index`, the norm's weight
    /// initialiser `norm`. `stored` names the table when it is already an initialiser (the tied
    /// embedding), so float precisions share it; quantised precisions get their own
    /// block-quantised copy either way.
    fn lm_head(&mut self, x: &str, norm: &str, stored: Option<&str>, table: Vec<f32>) -> Result<String> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let eps = self.cfg.rms_norm_eps as f32;
        match self.opts.precision {
            // Our own matmul, which takes the rows to compute: a constrained step reads only the
            // allowed tokens' rows of the head, a quarter of a 0.8B decode step's bytes. It
            // normalises only the positions picked.
            Precision::Int8 | Precision::Int4 => {
                let picked = self.pick_logit_positions(x);
                let q = Quantised::new(&mut self.b, self.opts.precision, self.opts.quant_block, "lm_head", &table, v, h)?;
                let around = Around { norm: Some((norm, eps)), ..Around::default() };
                Ok(q.node(&mut self.b, &picked, Some(HEAD_ROWS), around))
            }
            _ => {
                let x = rms_norm_node(&mut self.b, x, norm, eps);
                let x = &self.pick_logit_positions(&x);
                let name = match stored {
                    Some(n) => n.to_string(),
                    None => self.store_embedding(&table)?,
                };
                let t = self.cast_half_to_f32(name);
                let hs = self.b.ints(&[-1, h as i64])?;
                let flat = self.b.op("Reshape", &[x, &hs], vec![]);
                let y = self.b.op("Gemm", &[&flat, &t], vec![("transB", Attr::Int(1))]);
                let out_shape = self.b.op("Shape", &[x], vec![("start", Attr::Int(0)), ("end", Attr::Int(2))]);
                let vs = self.b.ints(&[v as i64])?;
                let full = self.b.op("Concat", &[&out_shape, &vs], vec![("axis", Attr::Int(0))]);
                Ok(self.b.op("Reshape", &[&y, &full], vec![]))
            }
        }
    }

    fn pick_logit_positions(&mut self, x: &str) -> String {
        self.b.op("Gather", &[x, "logits_index"], vec![("axis", Attr::Int(1))])
    }

    fn linear(&mut self, x: &str, name: &str, w: &[f32], out: usize, inp: usize, around: Around) -> Result<String> {
        linear(&mut self.b, self.opts.precision, self.opts.quant_block, x, name, w, out, inp, around)
    }

    /// The weights `{part}.weight [outputs, inp]` of `parts` (`(checkpoint name, outputs)`)
    /// stacked into one `[Σ outputs, inp]`.
    fn stacked(parts: &[(String, usize)], inp: usize, w: &mut dyn WeightSource) -> Result<Vec<f32>> {
        let out: usize = parts.iter().map(|(_, n)| n).sum();
        let mut all = Vec::with_capacity(out * inp);
        for (part, n) in parts {
            all.extend(w.get(&format!("{part}.weight"), &[*n, inp])?);
        }
        Ok(all)
    }

    /// The projections `parts` (`(checkpoint name, outputs)`, each `{name}.weight [outputs,
    /// inp]`) of the same `x` as one matmul named `name`, their outputs side by side. A decode
    /// step then reads `x` once, quantises it once and runs one node instead of several (each
    /// node costs ONNX Runtime a fixed few microseconds, and the smallest projections, 16 rows,
    /// are nearly all fixed cost); every part's rows are quantised as they would be alone.
    fn stacked_linear(
        &mut self,
        x: &str,
        name: &str,
        parts: &[(String, usize)],
        inp: usize,
        w: &mut dyn WeightSource,
        around: Around,
    ) -> Result<String> {
        let out: usize = parts.iter().map(|(_, n)| n).sum();
        let all = Self::stacked(parts, inp, w)?;
        self.linear(x, name, &all, out, inp, around)
    }

    /// An RMSNorm weight as an initialiser; `one_plus` selects Qwen3.5's zero-centred `(1 + w)`.
    fn norm_weight(&mut self, w: &[f32], one_plus: bool) -> Result<String> {
        let scale: Vec<f32> = if one_plus { w.iter().map(|&v| 1.0 + v).collect() } else { w.to_vec() };
        let name = self.b.fresh("norm");
        self.b.f32s(&name, &[scale.len() as i64], &scale)
    }

    /// RMSNorm over the last axis with the weight initialiser `scale`.
    fn rms_norm_by(&mut self, x: &str, scale: &str) -> String {
        rms_norm_node(&mut self.b, x, scale, self.cfg.rms_norm_eps as f32)
    }

    /// `x + attention(RMSNorm(x))`, the norm's weight initialiser `norm`.
    fn attention(&mut self, i: usize, x: &str, norm: &str, w: &mut dyn WeightSource) -> Result<String> {
        let cfg = self.cfg;
        let (h, nq, nkv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let p = format!("layers.{i}.self_attn.");
        let parts = [(format!("{p}q_proj"), 2 * nq * hd), (format!("{p}k_proj"), nkv * hd), (format!("{p}v_proj"), nkv * hd)];
        let qgkv = self.stacked_linear(x, &format!("{p}qkv_proj"), &parts, h, w, self.normed(norm))?;
        let q_norm = self.norm_weight(&w.get(&format!("{p}q_norm.weight"), &[hd])?, true)?;
        let k_norm = self.norm_weight(&w.get(&format!("{p}k_norm.weight"), &[hd])?, true)?;
        // Blockwise causal attention over the cache (ops::attention): no [heads, S, P+S] scores.
        // The op takes the projection whole and does the head norms, the rotary and the output
        // gate itself (src/ops/causal_attention.rs).
        let [past_k, past_v] = cfg.layer_states(i).map(|s| s.name);
        let (pk, pv) = (present_name(&past_k), present_name(&past_v));
        let gated = self.b.fresh("attn_out");
        self.b.node_named(
            self.opts.kv_cache.op(),
            ops::DOMAIN,
            &[&qgkv, "", "", &past_k, &past_v, &q_norm, &k_norm, &self.cos, &self.sin, PAST_LENGTHS],
            &[&gated, &pk, &pv],
            vec![
                ("num_heads", Attr::Int(nq as i64)),
                ("kv_num_heads", Attr::Int(nkv as i64)),
                ("scale", Attr::Float((hd as f32).powf(-0.5))),
                ("epsilon", Attr::Float(cfg.rms_norm_eps as f32)),
            ],
        );
        let o = w.get(&format!("{p}o_proj.weight"), &[h, nq * hd])?;
        self.linear(&gated, &format!("{p}o_proj"), &o, h, nq * hd, Around::added_to(x))
    }

    /// `x + delta_net(RMSNorm(x))`, the norm's weight initialiser `norm`.
    fn delta_net(&mut self, i: usize, x: &str, norm: &str, w: &mut dyn WeightSource) -> Result<String> {
        let cfg = self.cfg;
        let h = cfg.hidden_size;
        let (hv, dv) = (cfg.linear_num_value_heads, cfg.linear_value_head_dim);
        let (key_dim, value_dim, conv_dim, kw) = (cfg.key_dim(), cfg.value_dim(), cfg.conv_dim(), cfg.linear_conv_kernel_dim);
        let p = format!("layers.{i}.linear_attn.");
        let parts = [
            (format!("{p}in_proj_qkv"), conv_dim),
            (format!("{p}in_proj_z"), value_dim),
            (format!("{p}in_proj_b"), hv),
            (format!("{p}in_proj_a"), hv),
        ];
        let y = self.stacked_linear(x, &format!("{p}in_proj"), &parts, h, w, self.normed(norm))?;
        let sizes: Vec<i64> = parts.iter().map(|(_, n)| *n as i64).collect();
        let ys = self.b.split(&y, &sizes, -1)?;
        let (qkv, z, bl, al) = (&ys[0], &ys[1], &ys[2], &ys[3]);
        let conv_w = w.get(&format!("{p}conv1d.weight"), &[conv_dim, 1, kw])?;
        let conv_w = self.b.f32s(&format!("{p}conv1d.weight"), &[conv_dim as i64, kw as i64], &conv_w)?;
        let [past_conv, past_rec] = cfg.layer_states(i).map(|s| s.name);
        let (pc, pr) = (present_name(&past_conv), present_name(&past_rec));
        let mixed = self.causal_conv(qkv, &conv_w, &past_conv, &pc, conv_dim, kw)?;
        let parts = self.b.split(&mixed, &[key_dim as i64, key_dim as i64, value_dim as i64], -1)?;
        let a_log = w.get(&format!("{p}A_log"), &[hv])?;
        let neg_a: Vec<f32> = a_log.iter().map(|&a| -((a as f64).exp()) as f32).collect();
        let neg_a = self.b.f32s(&format!("{p}neg_exp_A"), &[hv as i64], &neg_a)?;
        let dt_bias = w.get(&format!("{p}dt_bias"), &[hv])?;
        let dt_bias = self.b.f32s(&format!("{p}dt_bias"), &[hv as i64], &dt_bias)?;
        // The gated RMSNorm's weight is plain, not 1 + w.
        let norm = w.get(&format!("{p}norm.weight"), &[dv])?;
        let norm = self.b.f32s(&format!("{p}norm.weight"), &[dv as i64], &norm)?;
        let gates = Gates { a: al, b: bl, neg_exp_a: &neg_a, dt_bias: &dt_bias, z, norm: &norm };
        let y = self.delta_rule([&parts[0], &parts[1], &parts[2]], gates, [&past_rec, &pr])?;
        let out = w.get(&format!("{p}out_proj.weight"), &[h, value_dim])?;
        self.linear(&y, &format!("{p}out_proj"), &out, h, value_dim, Around::added_to(x))
    }

    /// The DeltaNet's causal depthwise conv over `[q | k | v]` with its carried window: deltadoc's
    /// operator, or ORT's channels-first one for comparisons.
    fn causal_conv(&mut self, qkv: &str, conv_w: &str, past: &str, present: &str, conv_dim: usize, kw: usize) -> Result<String> {
        let mixed = self.b.fresh("conv_out");
        match self.opts.linear_attn {
            LinearAttn::Deltadoc => self.b.node_named(
                "CausalConv1dWithState",
                ops::DOMAIN,
                &[qkv, conv_w, past],
                &[&mixed, present],
                vec![("activation", Attr::Str("silu".into()))],
            ),
            LinearAttn::Builtin => {
                // ORT's op is channels-first: [B, C, T] with weight [C, 1, K].
                let x = self.b.op("Transpose", &[qkv], vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
                let w3 = self.b.reshape(conv_w, &[conv_dim as i64, 1, kw as i64])?;
                let y = self.b.fresh("conv_cf");
                self.b.node_named(
                    "CausalConvWithState",
                    "com.microsoft",
                    &[&x, &w3, "", past],
                    &[&y, present],
                    vec![("activation", Attr::Str("silu".into()))],
                );
                self.b.node_named("Transpose", "", &[&y], &[&mixed], vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
            }
        }
        Ok(mixed)
    }

    /// The gated delta rule over `[q, k, v]` with its carried state (`[past, present]`), its
    /// gates from `a` and `b`, and its output through the gated RMSNorm: deltadoc's operator,
    /// which does all of it in one node, or ORT's LinearAttention between the graph's own nodes
    /// for comparisons.
    fn delta_rule(&mut self, [q, k, v]: [&str; 3], gates: Gates, [past, present]: [&str; 2]) -> Result<String> {
        let cfg = self.cfg;
        let (hk, hv, dk, dv) =
            (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim);
        let o = self.b.fresh("rule_out");
        let scale = Attr::Float((dk as f32).powf(-0.5));
        match self.opts.linear_attn {
            LinearAttn::Deltadoc => {
                let Gates { a, b, neg_exp_a, dt_bias, z, norm } = gates;
                self.b.node_named(
                    "GatedDeltaRule",
                    ops::DOMAIN,
                    &[q, k, v, a, b, past, neg_exp_a, dt_bias, z, norm],
                    &[&o, present],
                    vec![
                        ("num_k_heads", Attr::Int(hk as i64)),
                        ("num_v_heads", Attr::Int(hv as i64)),
                        ("scale", scale),
                        ("use_qk_l2norm", Attr::Int(1)),
                        ("norm_epsilon", Attr::Float(cfg.rms_norm_eps as f32)),
                    ],
                );
                Ok(o)
            }
            LinearAttn::Builtin => {
                // beta = sigmoid(b); g = −exp(A_log) · softplus(a + dt_bias), in f32 as the
                // reference.
                let beta = self.b.op("Sigmoid", &[gates.b], vec![]);
                let a = self.b.op("Add", &[gates.a, gates.dt_bias], vec![]);
                let sp = self.b.op("Softplus", &[&a], vec![]);
                let g = self.b.op("Mul", &[&sp, gates.neg_exp_a], vec![]);
                // ORT's op expects L2-normalised q/k and applies `scale` itself; with fewer key
                // heads than state heads it shares key head h·Hk/Hv, as the reference's
                // repeat_interleave does.
                let q = self.l2norm_heads(q, hk, dk)?;
                let k = self.l2norm_heads(k, hk, dk)?;
                self.b.node_named(
                    "LinearAttention",
                    "com.microsoft",
                    &[&q, &k, v, past, &g, &beta],
                    &[&o, present],
                    vec![
                        ("q_num_heads", Attr::Int(hk as i64)),
                        ("kv_num_heads", Attr::Int(hv as i64)),
                        ("update_rule", Attr::Str("gated_delta".into())),
                        ("scale", scale),
                        // The reference's chunk, a hint to ORT's kernel (ours picks its own).
                        ("chunk_size", Attr::Int(64)),
                    ],
                );
                // Gated RMSNorm per value head, then the silu(z) gate.
                let o4 = self.b.reshape(&o, &[0, 0, hv as i64, dv as i64])?;
                let n = self.rms_norm_by(&o4, gates.norm);
                let z4 = self.b.reshape(gates.z, &[0, 0, hv as i64, dv as i64])?;
                let gate = silu(&mut self.b, &z4);
                let y = self.b.op("Mul", &[&n, &gate], vec![]);
                self.b.reshape(&y, &[0, 0, (hv * dv) as i64])
            }
        }
    }

    /// `x · rsqrt(Σx² + 1e-6)` per head of a packed `[B, T, heads·d]` tensor (the reference's l2norm).
    fn l2norm_heads(&mut self, x: &str, heads: usize, d: usize) -> Result<String> {
        let x4 = self.b.reshape(x, &[0, 0, heads as i64, d as i64])?;
        let axes = self.b.ints(&[-1])?;
        let ss = self.b.op("ReduceSumSquare", &[&x4, &axes], vec![("keepdims", Attr::Int(1))]);
        let eps = self.b.scalar(1e-6)?;
        let ss = self.b.op("Add", &[&ss, &eps], vec![]);
        let inv = self.b.op("Sqrt", &[&ss], vec![]);
        let y = self.b.op("Div", &[&x4, &inv], vec![]);
        self.b.reshape(&y, &[0, 0, (heads * d) as i64])
    }

    /// `x + down(silu(gate(RMSNorm(x))) · up(RMSNorm(x)))`, the norm's weight initialiser `norm`.
    fn mlp(&mut self, p: &str, x: &str, norm: &str, w: &mut dyn WeightSource) -> Result<String> {
        let (h, im) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let parts = [(format!("{p}mlp.gate_proj"), im), (format!("{p}mlp.up_proj"), im)];
        let around = Around { swiglu: true, ..self.normed(norm) };
        let y = self.stacked_linear(x, &format!("{p}mlp.gate_up_proj"), &parts, h, w, around)?;
        let down = w.get(&format!("{p}mlp.down_proj.weight"), &[h, im])?;
        self.linear(&y, &format!("{p}mlp.down_proj"), &down, h, im, Around::added_to(x))
    }

    /// A projection's input RMS-normalised by the weight initialiser `norm`.
    fn normed<'n>(&self, norm: &'n str) -> Around<'n> {
        Around { norm: Some((norm, self.cfg.rms_norm_eps as f32)), ..Around::default() }
    }
}

/// What a projection does around its product. The int8/int4 graphs fold all of it into their
/// `QuantMatMul` node, where it was up to six ONNX nodes, each a fixed few microseconds of a
/// decode step; float graphs spell it out in ONNX nodes.
#[derive(Clone, Copy, Default)]
pub(super) struct Around<'a> {
    /// RMSNorm of the input first, by this weight initialiser and epsilon.
    norm: Option<(&'a str, f32)>,
    /// `silu(first half) · second half` of the product, which it halves.
    swiglu: bool,
    /// Added to the result.
    residual: Option<&'a str>,
}

impl<'a> Around<'a> {
    /// The product added to `residual`.
    fn added_to(residual: &'a str) -> Self {
        Self { residual: Some(residual), ..Self::default() }
    }
}

fn rms_norm_node(b: &mut GraphBuilder, x: &str, scale: &str, epsilon: f32) -> String {
    b.op("RMSNormalization", &[x, scale], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(epsilon))])
}

fn silu(b: &mut GraphBuilder, x: &str) -> String {
    let s = b.op("Sigmoid", &[x], vec![]);
    b.op("Mul", &[x, &s], vec![])
}

/// NeoX rotary over the last axis (`width` values) of `x`: `x·cos + rotate_half(x)·sin`, where
/// rotate_half pairs value i with value i + width/2.
pub(super) fn neox_rotary(b: &mut GraphBuilder, x: &str, cos: &str, sin: &str, width: i64) -> Result<String> {
    let halves = b.split(x, &[width / 2, width / 2], -1)?;
    let neg = b.op("Neg", &[&halves[1]], vec![]);
    let rotated = b.op("Concat", &[&neg, &halves[0]], vec![("axis", Attr::Int(-1))]);
    let a = b.op("Mul", &[x, cos], vec![]);
    let r = b.op("Mul", &[&rotated, sin], vec![]);
    Ok(b.op("Add", &[&a, &r], vec![]))
}

/// `y = x · Wᵀ` for a PyTorch-layout weight `[out, in]`, in the configured precision (int8/int4
/// in blocks of `block` along `in`, [`quant::default_block`] when `None`), with what `around`
/// asks before and after it.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    b: &mut GraphBuilder,
    precision: Precision,
    block: Option<usize>,
    x: &str,
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    around: Around,
) -> Result<String> {
    match precision {
        Precision::Fp32 | Precision::Fp16 => {
            let x = match around.norm {
                Some((scale, eps)) => rms_norm_node(b, x, scale, eps),
                None => x.to_string(),
            };
            let wt = quant::transpose(w, out, inp);
            let wname = b.fresh(name);
            let init = if precision == Precision::Fp32 {
                b.f32s(&wname, &[inp as i64, out as i64], &wt)?
            } else {
                let half = b.initializer(&wname, data_type::FLOAT16, &[inp as i64, out as i64], &quant::to_f16_bytes(&wt))?;
                b.op("Cast", &[&half], vec![("to", Attr::Int(data_type::FLOAT as i64))])
            };
            let mut y = b.op("MatMul", &[&x, &init], vec![]);
            if around.swiglu {
                let half = (out / 2) as i64;
                let halves = b.split(&y, &[half, half], -1)?;
                let act = silu(b, &halves[0]);
                y = b.op("Mul", &[&act, &halves[1]], vec![]);
            }
            Ok(match around.residual {
                Some(r) => b.op("Add", &[r, &y], vec![]),
                None => y,
            })
        }
        // deltadoc's own matmul at every M: level with or ahead of `MatMulNBits` from one row to
        // prefill's hundreds, and nothing for ORT to prepack, so the weights are held once
        // (onnx/README.md, "QuantMatMul").
        Precision::Int8 | Precision::Int4 => {
            let q = Quantised::new(b, precision, block, name, w, out, inp)?;
            Ok(q.node(b, x, None, around))
        }
    }
}

/// A weight block-quantised as for `MatMulNBits` and packed in panels for `QuantMatMul`
/// (`Weights::pack` in crates/kernels/src/quant_matmul.rs): one initialiser.
struct Quantised {
    packed: String,
    attrs: [(i64, &'static str); 4],
}

impl Quantised {
    /// Quantises `w [out, in]` in blocks of `block` along `in` ([`quant::default_block`] when
    /// `None`).
    fn new(
        b: &mut GraphBuilder,
        precision: Precision,
        block: Option<usize>,
        name: &str,
        w: &[f32],
        out: usize,
        inp: usize,
    ) -> Result<Self> {
        let bits = if precision == Precision::Int8 { 8 } else { 4 };
        let block = block.unwrap_or_else(|| quant::default_block(precision));
        let q = quant::block_quantize(w, out, inp, bits, block);
        let packed = Weights::pack(&q.data, &q.scales, out, inp, bits, block).map_err(|e| anyhow!("{name}: {e}"))?;
        let panels = out.div_ceil(PANEL_ROWS);
        let packed_name = b.fresh(&format!("{name}.packed"));
        let shape = [panels as i64, (packed.len() / panels) as i64];
        let packed = b.initializer(&packed_name, data_type::UINT8, &shape, &packed)?;
        let attrs = [(inp as i64, "K"), (out as i64, "N"), (bits as i64, "bits"), (block as i64, "block_size")];
        Ok(Self { packed, attrs })
    }

    /// The `QuantMatMul` node of `x` (and the head's `rows`), `around` folded in; its output.
    fn node(&self, b: &mut GraphBuilder, x: &str, rows: Option<&str>, around: Around) -> String {
        let mut attrs: Vec<(&str, Attr)> = self.attrs.iter().map(|&(v, k)| (k, Attr::Int(v))).collect();
        if let Some((_, eps)) = around.norm {
            attrs.push(("epsilon", Attr::Float(eps)));
        }
        if around.swiglu {
            attrs.push(("activation", Attr::Str("swiglu".into())));
        }
        // Inputs by position (onnx/README.md, "QuantMatMul"): "" for one left out, none after
        // the last given.
        let mut inputs =
            vec![x, &self.packed, rows.unwrap_or(""), around.norm.map_or("", |(s, _)| s), around.residual.unwrap_or("")];
        while inputs.last() == Some(&"") {
            inputs.pop();
        }
        b.node_in("QuantMatMul", ops::DOMAIN, &inputs, 1, attrs).remove(0)
    }
}

/// Axis (0 = T, 1 = H, 2 = W) of each rotary frequency under interleaved MRoPE: frequency i uses
/// axis i mod 3 while that axis still has budget in `mrope_section`, as in the reference's
/// `apply_interleaved_mrope` (H takes slots 1, 4, …, W slots 2, 5, …, the rest stay T).
pub fn mrope_axes(section: &[usize]) -> Vec<usize> {
    let half: usize = section.iter().sum();
    let mut axis = vec![0usize; half];
    for (a, &len) in section.iter().enumerate().skip(1) {
        for slot in (a..len * 3).step_by(3) {
            if slot < half {
                axis[slot] = a;
            }
        }
    }
    axis
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_mrope_matches_the_reference_slices() {
        // docs/model.md, "Positions": slices 1:33:3 go to H and 2:30:3 to W for mrope_section [11, 11, 10].
        let ax = mrope_axes(&[11, 11, 10]);
        assert_eq!(ax.len(), 32);
        for (i, &a) in ax.iter().enumerate() {
            let want = if (1..33).step_by(3).any(|s| s == i) {
                1
            } else if (2..30).step_by(3).any(|s| s == i) {
                2
            } else {
                0
            };
            assert_eq!(a, want, "frequency {i}");
        }
        assert_eq!(ax.iter().filter(|&&a| a == 0).count(), 11);
        assert_eq!(ax.iter().filter(|&&a| a == 2).count(), 10);
    }
}
