//! The Qwen3.5 vision tower as its own ONNX graph (docs/model.md, "Vision tower and image preprocessing"): patch embedding, learned
//! position table resampled to the image's grid, 2-D rotary, bidirectional blocks, and the 2×2
//! merger that turns four patches into one `<|image_pad|>` embedding of the text width.
//!
//! Everything that depends only on the grid (the bilinear taps into the 48×48 position table and
//! the rotary cos/sin) is computed by the caller ([`crate::vision::encoder`]) and fed as inputs,
//! so the graph holds just the learned part and runs one image per call.
//!
//! Interface: inputs `pixel_values [N, C·Tp·P·P] f32` (rows in 2×2-block order),
//! `pos_index [N, 4] i64` and `pos_weight [N, 4] f32` (bilinear taps), `rotary_cos` and
//! `rotary_sin [N, dh] f32`; output `image_embeds [N/m², out_hidden] f32`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::config::Shape;
use super::graph::{Around, WeightSource, linear, neox_rotary};
use super::quant::Precision;
use crate::onnx::proto::data_type;
use crate::onnx::{Attr, Dim, GraphBuilder};

/// The vision tower's hyper-parameters and the special tokens that frame an image in the prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Transformer blocks of the tower.
    pub depth: usize,
    /// Width of the tower's residual stream.
    pub hidden_size: usize,
    /// Width of a block's MLP.
    pub intermediate_size: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Width of the merged output (the text model's hidden size).
    pub out_hidden_size: usize,
    /// Input channels (RGB).
    pub in_channels: usize,
    /// Side of a square patch in pixels.
    pub patch_size: usize,
    /// Frames per patch (a still image is duplicated to fill them).
    pub temporal_patch_size: usize,
    /// Side of the block of patches the merger turns into one token.
    pub spatial_merge_size: usize,
    /// Entries of the learned position table (a square grid).
    pub num_position_embeddings: usize,
    /// Base of the 2-D rotary frequencies.
    pub rope_theta: f64,
    /// `<|image_pad|>`: one per merged token.
    pub image_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
}

impl VisionConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per patch row of `pixel_values`: channels × frames × pixels.
    pub fn patch_values(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Side of the learned position grid (48 for Qwen3.5).
    pub fn grid_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }

    /// Pixels per side of one merged token (32 for Qwen3.5): images are resized to multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.spatial_merge_size
    }

    /// Checks the values the graph and the preprocessing rely on.
    pub fn validate(&self, text_hidden: usize) -> Result<()> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) || !self.head_dim().is_multiple_of(4) {
            bail!("vision hidden_size {} is not divisible into {} heads of a multiple of 4", self.hidden_size, self.num_heads);
        }
        if self.grid_side() * self.grid_side() != self.num_position_embeddings {
            bail!("vision num_position_embeddings {} is not a square grid", self.num_position_embeddings);
        }
        if self.out_hidden_size != text_hidden {
            bail!(
                "vision out_hidden_size {} differs from the text hidden size {text_hidden}: image features could not replace token embeddings",
                self.out_hidden_size
            );
        }
        if self.in_channels != 3 || self.spatial_merge_size == 0 || self.patch_size == 0 || self.temporal_patch_size == 0 {
            bail!("vision config needs 3 input channels and non-zero patch, temporal patch and merge sizes");
        }
        Ok(())
    }

    /// Reads `vision_config` and the image token ids of a Hugging Face `qwen3_5` `config.json`;
    /// `None` when the file has no vision part (a text-only checkpoint).
    pub fn from_hf_json(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let Some(vc) = v.get("vision_config") else { return Ok(None) };
        let num = |k: &str, d: Option<usize>| -> Result<usize> {
            match vc.get(k).and_then(|x| x.as_u64()) {
                Some(x) => Ok(x as usize),
                None => d.with_context(|| format!("{}: vision_config.{k} missing or not an integer", path.display())),
            }
        };
        let id = |k: &str, d: u32| v.get(k).and_then(|x| x.as_u64()).map(|x| x as u32).unwrap_or(d);
        let theta = vc
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| vc.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .unwrap_or(10_000.0);
        Ok(Some(Self {
            depth: num("depth", None)?,
            hidden_size: num("hidden_size", None)?,
            intermediate_size: num("intermediate_size", None)?,
            num_heads: num("num_heads", None)?,
            out_hidden_size: num("out_hidden_size", None)?,
            in_channels: num("in_channels", Some(3))?,
            patch_size: num("patch_size", Some(16))?,
            temporal_patch_size: num("temporal_patch_size", Some(2))?,
            spatial_merge_size: num("spatial_merge_size", Some(2))?,
            num_position_embeddings: num("num_position_embeddings", Some(2304))?,
            rope_theta: theta,
            image_token_id: id("image_token_id", IMAGE_PAD),
            vision_start_token_id: id("vision_start_token_id", VISION_START),
            vision_end_token_id: id("vision_end_token_id", VISION_END),
        }))
    }

    /// The vision tower of a named shape (docs/model.md, "Shapes"). The 2B tower is not published in
    /// any copy we could read; the 4B one is used, which the spec marks unverified.
    pub fn of_shape(shape: Shape, text_hidden: usize) -> Self {
        let (depth, hidden, inter, heads) = match shape {
            Shape::Tiny => (2, 64, 128, 4),
            Shape::B0_8 => (12, 768, 3072, 12),
            Shape::B2 | Shape::B4 => (24, 1024, 4096, 16),
            Shape::B9 => (27, 1152, 4304, 16),
        };
        Self {
            depth,
            hidden_size: hidden,
            intermediate_size: inter,
            num_heads: heads,
            out_hidden_size: text_hidden,
            in_channels: 3,
            patch_size: 16,
            temporal_patch_size: 2,
            spatial_merge_size: 2,
            num_position_embeddings: 2304,
            rope_theta: 10_000.0,
            image_token_id: IMAGE_PAD,
            vision_start_token_id: VISION_START,
            vision_end_token_id: VISION_END,
        }
    }
}

/// `<|image_pad|>` of the Qwen3.5 vocabulary.
pub const IMAGE_PAD: u32 = 248_056;
/// `<|vision_start|>`.
pub const VISION_START: u32 = 248_053;
/// `<|vision_end|>`.
pub const VISION_END: u32 = 248_054;

/// Writes the vision graph into `b`; progress is reported per block through `on_block`.
pub fn build(
    mut b: GraphBuilder,
    cfg: &VisionConfig,
    w: &mut dyn WeightSource,
    precision: Precision,
    on_block: &mut dyn FnMut(usize),
) -> Result<GraphBuilder> {
    let (d, di, nh, dh) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim());
    let n = Dim::Named("patches");
    b.input("pixel_values", data_type::FLOAT, &[n.clone(), Dim::Fixed(cfg.patch_values() as i64)]);
    b.input("pos_index", data_type::INT64, &[n.clone(), Dim::Fixed(4)]);
    b.input("pos_weight", data_type::FLOAT, &[n.clone(), Dim::Fixed(4)]);
    b.input("rotary_cos", data_type::FLOAT, &[n.clone(), Dim::Fixed(dh as i64)]);
    b.input("rotary_sin", data_type::FLOAT, &[n, Dim::Fixed(dh as i64)]);
    b.output("image_embeds", data_type::FLOAT, &[Dim::Named("tokens"), Dim::Fixed(cfg.out_hidden_size as i64)]);
    let mut v = Vision { b, precision };

    // Conv3d with stride = kernel is a linear map of each flattened (c, t, y, x) patch.
    let pv = cfg.patch_values();
    let kernel = [d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size];
    let x = v.dense_shaped(w, "visual.patch_embed.proj", "pixel_values", d, pv, &kernel)?;
    let table = w.get("visual.pos_embed.weight", &[cfg.num_position_embeddings, d])?;
    let table = v.b.f32s("visual.pos_embed.weight", &[cfg.num_position_embeddings as i64, d as i64], &table)?;
    let taps = v.b.op("Gather", &[&table, "pos_index"], vec![("axis", Attr::Int(0))]);
    let axes = v.b.ints(&[-1])?;
    let weights = v.b.op("Unsqueeze", &["pos_weight", &axes], vec![]);
    let weighted = v.b.op("Mul", &[&taps, &weights], vec![]);
    let ax1 = v.b.ints(&[1])?;
    let pos = v.b.op("ReduceSum", &[&weighted, &ax1], vec![("keepdims", Attr::Int(0))]);
    let mut x = v.b.op("Add", &[&x, &pos], vec![]);

    let cos = v.b.op("Unsqueeze", &["rotary_cos", &ax1], vec![]);
    let sin = v.b.op("Unsqueeze", &["rotary_sin", &ax1], vec![]);
    for j in 0..cfg.depth {
        let p = format!("visual.blocks.{j}.");
        let h = v.layer_norm(w, &format!("{p}norm1"), &x, d)?;
        let qkv = v.dense(w, &format!("{p}attn.qkv"), &h, 3 * d, d)?;
        let qkv = v.b.reshape(&qkv, &[0, 3, nh as i64, dh as i64])?;
        let parts = v.b.split(&qkv, &[1, 1, 1], 1)?;
        // q, k: [N, nh, dh] rotated over the whole head; v stays [N, 1, nh, dh].
        let q = v.rope(&parts[0], &cos, &sin, dh)?;
        let k = v.rope(&parts[1], &cos, &sin, dh)?;
        let flat = |v: &mut Vision, t: &str| v.b.reshape(t, &[1, -1, d as i64]);
        let (q, k, val) = (flat(&mut v, &q)?, flat(&mut v, &k)?, flat(&mut v, &parts[2])?);
        // Bidirectional attention over the whole image (one image per call). ORT's CPU
        // MultiHeadAttention streams over key blocks, so no [N, N] score matrix per head is kept.
        let ctx =
            v.b.node_in(
                "MultiHeadAttention",
                "com.microsoft",
                &[&q, &k, &val],
                1,
                vec![("num_heads", Attr::Int(nh as i64)), ("scale", Attr::Float((dh as f32).powf(-0.5)))],
            )
            .remove(0);
        let ctx = v.b.reshape(&ctx, &[-1, d as i64])?;
        let attn = v.dense(w, &format!("{p}attn.proj"), &ctx, d, d)?;
        x = v.b.op("Add", &[&x, &attn], vec![]);
        let h = v.layer_norm(w, &format!("{p}norm2"), &x, d)?;
        let h = v.dense(w, &format!("{p}mlp.linear_fc1"), &h, di, d)?;
        let h = v.b.op("Gelu", &[&h], vec![("approximate", Attr::Str("tanh".into()))]);
        let h = v.dense(w, &format!("{p}mlp.linear_fc2"), &h, d, di)?;
        x = v.b.op("Add", &[&x, &h], vec![]);
        on_block(j);
    }
    // Merger: norm per patch, then each run of m² consecutive patches (one 2×2 block) as one row.
    let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
    let x = v.layer_norm(w, "visual.merger.norm", &x, d)?;
    let x = v.b.reshape(&x, &[-1, (unit * d) as i64])?;
    let x = v.dense(w, "visual.merger.linear_fc1", &x, unit * d, unit * d)?;
    let x = v.b.op("Gelu", &[&x], vec![]);
    let y = v.dense(w, "visual.merger.linear_fc2", &x, cfg.out_hidden_size, unit * d)?;
    v.b.node_named("Identity", "", &[&y], &["image_embeds"], vec![]);
    Ok(v.b)
}

struct Vision {
    b: GraphBuilder,
    precision: Precision,
}

impl Vision {
    /// `x · Wᵀ + bias` for a PyTorch Linear.
    fn dense(&mut self, w: &mut dyn WeightSource, name: &str, x: &str, out: usize, inp: usize) -> Result<String> {
        self.dense_shaped(w, name, x, out, inp, &[out, inp])
    }

    /// [`Self::dense`] for a weight stored as `shape` whose trailing axes flatten to `inp` (the
    /// patch Conv3d: stride = kernel makes it a Linear over the flattened patch).
    fn dense_shaped(
        &mut self,
        w: &mut dyn WeightSource,
        name: &str,
        x: &str,
        out: usize,
        inp: usize,
        shape: &[usize],
    ) -> Result<String> {
        let wt = w.get(&format!("{name}.weight"), shape)?;
        let bias = w.get(&format!("{name}.bias"), &[out])?;
        // Never int8/int4: export_vision stores fp32 or fp16.
        let y = linear(&mut self.b, self.precision, None, x, name, &wt, out, inp, Around::default())?;
        let bn = self.b.f32s(&format!("{name}.bias"), &[out as i64], &bias)?;
        Ok(self.b.op("Add", &[&y, &bn], vec![]))
    }

    fn layer_norm(&mut self, w: &mut dyn WeightSource, name: &str, x: &str, d: usize) -> Result<String> {
        let scale = w.get(&format!("{name}.weight"), &[d])?;
        let bias = w.get(&format!("{name}.bias"), &[d])?;
        let s = self.b.f32s(&format!("{name}.weight"), &[d as i64], &scale)?;
        let bn = self.b.f32s(&format!("{name}.bias"), &[d as i64], &bias)?;
        Ok(self.b.op("LayerNormalization", &[x, &s, &bn], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-6))]))
    }

    /// NeoX rotary over the whole head of `x [N, 1, nh, dh]` with cos/sin `[N, 1, dh]`; returns
    /// `[N, nh, dh]`.
    fn rope(&mut self, x: &str, cos: &str, sin: &str, dh: usize) -> Result<String> {
        let ax = self.b.ints(&[1])?;
        let x = self.b.op("Squeeze", &[x, &ax], vec![]);
        neox_rotary(&mut self.b, &x, cos, sin, dh as i64)
    }
}
