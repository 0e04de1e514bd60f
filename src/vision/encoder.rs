//! Running the vision graph: the grid-dependent inputs (bilinear taps into the learned position
//! table, 2-D rotary tables) are computed here exactly as the reference, then one call per image.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use ndarray::Array2;
use ort::session::Session;
use ort::value::Tensor;

use super::preprocess::Preprocessed;
use crate::model::ModelDir;
use crate::model::vision::VisionConfig;
use crate::runtime::{self, Prepack, SessionOptions};

/// An open vision graph.
pub struct VisionEncoder {
    session: Session,
    cfg: VisionConfig,
}

impl VisionEncoder {
    /// Opens the model folder's `vision.onnx`; an error names the folder when it has none.
    pub fn open(model: &ModelDir, opts: &SessionOptions) -> Result<Self> {
        let (cfg, path) = model.vision()?;
        Self::from_graph(&path, cfg, opts)
    }

    /// Opens a `vision.onnx` of the tower `cfg` outside a model folder.
    pub fn from_graph(path: &Path, cfg: &VisionConfig, opts: &SessionOptions) -> Result<Self> {
        let session = runtime::open_session_with(path, opts, Prepack::No)?;
        Ok(Self { session, cfg: cfg.clone() })
    }

    /// The tower's configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Vision features `[tokens, out_hidden]` of one preprocessed image.
    pub fn encode(&mut self, image: &Preprocessed) -> Result<Array2<f32>> {
        let [t, gh, gw] = image.grid;
        let m = self.cfg.spatial_merge_size;
        if gh % m != 0 || gw % m != 0 || t == 0 {
            return Err(anyhow!("image grid {t}×{gh}×{gw} is not a whole number of {m}×{m} blocks"));
        }
        let (coords, index, weight) = grid_inputs(&self.cfg, gh, gw, t);
        let (cos, sin) = rotary(&self.cfg, &coords);
        let inputs = ort::inputs![
            "pixel_values" => Tensor::from_array(image.pixel_values.clone())?,
            "pos_index" => Tensor::from_array(index)?,
            "pos_weight" => Tensor::from_array(weight)?,
            "rotary_cos" => Tensor::from_array(cos)?,
            "rotary_sin" => Tensor::from_array(sin)?,
        ];
        let out = self.session.run(inputs).map_err(|e| anyhow!("vision graph run failed: {e}"))?;
        let (shape, data) =
            out.get("image_embeds").context("vision graph has no image_embeds output")?.try_extract_tensor::<f32>()?;
        Ok(Array2::from_shape_vec((shape[0] as usize, shape[1] as usize), data.to_vec())?)
    }
}

/// Per patch in block order: its (row, column) in the grid, and the four bilinear taps
/// (align_corners = true) into the square position table with their weights, in the reference's
/// f32 arithmetic (`get_vision_interpolation_indices_and_weights`).
pub fn grid_inputs(cfg: &VisionConfig, gh: usize, gw: usize, t: usize) -> (Vec<(usize, usize)>, Array2<i64>, Array2<f32>) {
    let m = cfg.spatial_merge_size;
    let side = cfg.grid_side();
    let n = t * gh * gw;
    let mut coords = Vec::with_capacity(n);
    let mut index = Array2::<i64>::zeros((n, 4));
    let mut weight = Array2::<f32>::zeros((n, 4));
    let axis = |i: usize, size: usize| -> ([usize; 2], [f32; 2]) {
        let src = (i as f32 * (side - 1) as f32) / (size.max(2) - 1) as f32;
        let fl = src.floor();
        let lo = (fl as usize).min(side - 1);
        // Hat weights 1 − |src − tap| written as the reference does, so they round the same.
        let w0 = 1.0 - (src - fl).abs();
        let w1 = 1.0 - (src - fl - 1.0).abs();
        ([lo, (lo + 1).min(side - 1)], [w0.max(0.0), w1.max(0.0)])
    };
    for p in 0..n {
        let within = p % (gh * gw);
        let (in_col, in_row) = (within % m, (within / m) % m);
        let blocks_w = gw / m;
        let (block_col, block_row) = ((within / (m * m)) % blocks_w, within / (m * m * blocks_w));
        let (row, col) = (block_row * m + in_row, block_col * m + in_col);
        coords.push((row, col));
        let (ht, hw) = axis(row, gh);
        let (wt, ww) = axis(col, gw);
        for a in 0..2 {
            for b in 0..2 {
                index[[p, a * 2 + b]] = (ht[a] * side + wt[b]) as i64;
                weight[[p, a * 2 + b]] = hw[a] * ww[b];
            }
        }
    }
    (coords, index, weight)
}

/// cos/sin `[N, dh]` of the 2-D rotary: frequencies `θ^(−2i/(dh/2))` for i < dh/4, applied to the
/// row for the first quarter and the column for the second, the whole repeated (NeoX halves).
pub fn rotary(cfg: &VisionConfig, coords: &[(usize, usize)]) -> (Array2<f32>, Array2<f32>) {
    let dh = cfg.head_dim();
    let quarter = dh / 4;
    let spatial = (dh / 2) as f32;
    let inv: Vec<f32> = (0..quarter).map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / spatial)).collect();
    let mut cos = Array2::<f32>::zeros((coords.len(), dh));
    let mut sin = Array2::<f32>::zeros((coords.len(), dh));
    for (p, &(r, c)) in coords.iter().enumerate() {
        for (i, &f) in inv.iter().enumerate() {
            let (ar, ac) = (r as f32 * f, c as f32 * f);
            for base in [0, dh / 2] {
                cos[[p, base + i]] = ar.cos();
                sin[[p, base + i]] = ar.sin();
                cos[[p, base + quarter + i]] = ac.cos();
                sin[[p, base + quarter + i]] = ac.sin();
            }
        }
    }
    (cos, sin)
}
