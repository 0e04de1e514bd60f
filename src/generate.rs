//! Running the decoder graph: chunked prefill carrying KV cache and DeltaNet state between calls,
//! token-by-token decode, and sampling.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array, Array2, Array3, ArrayD, IxDyn};
use ort::session::Session;
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor, TensorRef};
use rand::{RngExt, SeedableRng, rngs::StdRng};

use crate::model::ModelDir;
use crate::model::config::{LayerKind, TextConfig};
use crate::model::graph::KvCache;
use crate::model::graph::{present_name, state_names};
use crate::model::quant::Precision;
use crate::progress::Progress;
use crate::runtime::{self, Prepack, SessionOptions};
use crate::snapshot::{Elem, Snapshot, StateData, StateTensor, ids_digest};

/// A decoder session with its carried state (one sequence).
pub struct Decoder {
    session: Session,
    cfg: TextConfig,
    /// (input name, current value) for every per-layer state input.
    state: Vec<(String, Carried)>,
    past_len: usize,
    /// Tokens the attention caches are reserved for ([`Self::reserve`]).
    reserved: usize,
    /// Rotary position of the next token minus `past_len`: 0 for text, and after an image the
    /// reference's `rope_delta` (an image advances positions by its grid side, not its tokens).
    rope_delta: i64,
    /// [`crate::model::Manifest::identity`] of the model, stamped on snapshots.
    identity: String,
    /// Element type of the attention caches.
    kv_cache: KvCache,
}

/// Which positions of a call produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (parity checks).
    All,
}

impl Decoder {
    /// Opens the model folder's graph with deltadoc's operators and starts an empty sequence.
    pub fn open(model: &ModelDir, opts: &SessionOptions) -> Result<Self> {
        let prepack = match model.manifest.precision {
            Precision::Int8 | Precision::Int4 => Prepack::Yes,
            Precision::Fp32 | Precision::Fp16 => Prepack::No,
        };
        let session = runtime::open_session_with(&model.graph_path(), opts, prepack)?;
        let cfg = model.manifest.config.clone();
        let identity = model.manifest.identity();
        let kv_cache = model.manifest.kv_cache;
        let mut d = Self { session, cfg, state: Vec::new(), past_len: 0, reserved: 0, rope_delta: 0, identity, kv_cache };
        d.reset()?;
        Ok(d)
    }

    /// Bytes of the carried state (KV cache of the attention layers + conv and recurrent state).
    pub fn state_bytes(&self) -> usize {
        self.state
            .iter()
            .filter_map(|(_, v)| v.layout().ok())
            .map(|(shape, elem)| elem.width() * shape.iter().product::<usize>())
            .sum()
    }

    /// Shape and values (widened to f32) of one carried state
    /// (`past.<layer>.<key|value|conv|recurrent>`), as the next call will read it.
    pub fn state(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let (_, v) = self.state.iter().find(|(n, _)| n == name)?;
        v.copy().ok().map(|(shape, data)| (shape, data.to_f32()))
    }

    /// Makes room in the attention caches for a sequence of `tokens` tokens in all, so that it
    /// never reallocates (and copies) a cache on the way. Only address space is taken up front:
    /// memory is committed as rows are written. Kept across [`Self::reset`]; a sequence that
    /// outgrows it still works, growing by a quarter at a time.
    pub fn reserve(&mut self, tokens: usize) {
        self.reserved = tokens;
        for (_, c) in &mut self.state {
            if let Carried::Rows { data, heads, head_dim } = c {
                let want = tokens * *heads * *head_dim;
                reserve_exact(data, want.saturating_sub(data.len()));
            }
        }
    }

    /// Tokens consumed so far in this sequence.
    pub fn tokens(&self) -> usize {
        self.past_len
    }

    /// Copy of the whole state at this token boundary.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut tensors = Vec::with_capacity(self.state.len());
        for (name, v) in &self.state {
            let (shape, data) = v.copy()?;
            tensors.push(StateTensor { name: name.clone(), shape, data });
        }
        Ok(Snapshot {
            model: self.identity.clone(),
            tokens: self.past_len,
            rope_delta: self.rope_delta,
            prefix_sha256: String::new(),
            tensors,
        })
    }

    /// Continues from `snap` as if the tokens it covers had just been fed; the next call's
    /// logits are exactly those of an uninterrupted run with the same call boundaries.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        if snap.model != self.identity {
            bail!("snapshot belongs to model {}, this decoder runs {}", snap.model, self.identity);
        }
        if snap.tensors.len() != self.state.len() {
            bail!("snapshot has {} state tensors, the model has {}", snap.tensors.len(), self.state.len());
        }
        for ((name, current), t) in self.state.iter().zip(&snap.tensors) {
            let (shape, elem) = current.layout()?;
            // Only the attention caches grow, along their time axis, which must hold `tokens` rows.
            let grows = matches!(current, Carried::Rows { .. });
            let fits = shape.len() == t.shape.len()
                && shape
                    .iter()
                    .zip(&t.shape)
                    .enumerate()
                    .all(|(i, (&now, &saved))| if grows && i == 1 { saved == snap.tokens } else { now == saved });
            if &t.name != name || !fits || elem != t.data.elem() || t.data.len() != t.shape.iter().product::<usize>() {
                bail!("snapshot tensor {} {:?} does not fit state {name} {:?}", t.name, t.shape, shape);
            }
        }
        // The caches are overwritten in place, keeping their reservation: a restore holds the KV
        // twice (cache and snapshot), as the memory plan counts, and the stage that follows
        // appends without reallocating.
        for ((_, current), t) in self.state.iter_mut().zip(&snap.tensors) {
            match current {
                Carried::Rows { data, .. } => overwrite(data, &t.data),
                Carried::Whole(v) => match state_value(&t.shape, t.data.clone()) {
                    Ok(new) => *v = new,
                    Err(e) => {
                        self.reset()?;
                        return Err(e.context(format!("restoring state tensor {}", t.name)));
                    }
                },
            }
        }
        self.past_len = snap.tokens;
        self.rope_delta = snap.rope_delta;
        Ok(())
    }

    /// Drops all state: the next call starts a new sequence.
    pub fn reset(&mut self) -> Result<()> {
        let c = &self.cfg;
        self.state.clear();
        for i in 0..c.num_hidden_layers {
            let [a, s] = state_names(c, i);
            match c.layer_kind(i) {
                LayerKind::Full => {
                    let width = c.num_key_value_heads * c.head_dim;
                    for name in [a, s] {
                        let mut data = StateData::zeros(self.kv_cache.elem(), 0);
                        reserve_exact(&mut data, self.reserved * width);
                        self.state.push((name, Carried::Rows { data, heads: c.num_key_value_heads, head_dim: c.head_dim }));
                    }
                }
                LayerKind::Linear => {
                    let conv = vec![1, c.conv_dim(), c.linear_conv_kernel_dim - 1];
                    let rec = vec![1, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim];
                    for (name, dims) in [(a, conv), (s, rec)] {
                        let n = dims.iter().product();
                        self.state.push((name, Carried::Whole(state_value(&dims, StateData::zeros(Elem::F32, n))?)));
                    }
                }
            }
        }
        self.past_len = 0;
        self.rope_delta = 0;
        Ok(())
    }

    /// Feeds `ids` as the next text tokens of the sequence and returns logits `[n, vocab]`.
    pub fn forward(&mut self, ids: &[u32], which: Logits) -> Result<Array2<f32>> {
        self.forward_with(ids, None, None, which)
    }

    /// [`Self::forward`] with explicit rotary positions `[3, S]` (T/H/W rows; default: the next
    /// text positions) and the vision features `[M, H]` of the M `<|image_pad|>` tokens in
    /// `ids`, in order.
    pub fn forward_with(
        &mut self,
        ids: &[u32],
        positions: Option<ndarray::ArrayView2<'_, i64>>,
        image_rows: Option<ndarray::ArrayView2<'_, f32>>,
        which: Logits,
    ) -> Result<Array2<f32>> {
        if ids.is_empty() {
            bail!("forward called with no tokens");
        }
        let s = ids.len();
        if self.past_len + s > self.cfg.max_position_embeddings {
            bail!(
                "sequence of {} tokens exceeds the model's context of {} tokens",
                self.past_len + s,
                self.cfg.max_position_embeddings
            );
        }
        let input_ids = Array2::from_shape_vec((1, s), ids.iter().map(|&i| i as i64).collect())?;
        let position_ids = match positions {
            Some(p) if p.dim() == (3, s) => p.to_owned().into_shape_with_order((3, 1, s))?,
            Some(p) => bail!("positions of shape {:?} for {s} tokens (expected [3, {s}])", p.dim()),
            None => {
                let next = self.past_len as i64 + self.rope_delta;
                Array3::from_shape_fn((3, 1, s), |(_, _, t)| next + t as i64)
            }
        };
        let h = self.cfg.hidden_size;
        let image_embeds = match image_rows {
            Some(r) if r.ncols() == h => r.to_owned(),
            Some(r) => bail!("image features of width {} for a model of hidden size {h}", r.ncols()),
            None => Array2::zeros((0, h)),
        };
        let index: Vec<i64> = match which {
            Logits::Last => vec![s as i64 - 1],
            Logits::All => (0..s as i64).collect(),
        };
        let n = index.len();
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = vec![
            ("input_ids".into(), Tensor::from_array(input_ids)?.into_dyn().into()),
            ("position_ids".into(), Tensor::from_array(position_ids)?.into_dyn().into()),
            ("logits_index".into(), Tensor::from_array(Array::from_vec(index))?.into_dyn().into()),
            ("image_embeds".into(), Tensor::from_array(image_embeds)?.into_dyn().into()),
        ];
        for (name, v) in &self.state {
            inputs.push((name.clone(), v.input()?));
        }
        let mut out = self.session.run(inputs).map_err(|e| anyhow!("decoder run failed: {e}"))?;
        let logits = out.remove("logits").context("graph has no logits output")?;
        let (shape, data) = logits.try_extract_tensor::<f32>()?;
        let v = *shape.last().unwrap_or(&0) as usize;
        let logits = Array2::from_shape_vec((n, v), data.to_vec())?;
        for (name, carried) in &mut self.state {
            let present = present_name(name);
            let value = out.remove(&present).with_context(|| format!("graph has no output {present}"))?;
            match carried {
                Carried::Whole(v) => *v = value,
                Carried::Rows { data, .. } => append(data, &value).with_context(|| format!("graph output {present}"))?,
            }
        }
        self.past_len += s;
        Ok(logits)
    }

    /// Feeds a prompt with images in chunks of `chunk` tokens, continuing the sequence;
    /// `on_chunk` gets each chunk's logits (`which` selects the rows).
    pub fn prefill_prompt(
        &mut self,
        feed: PromptFeed<'_>,
        chunk: usize,
        which: Logits,
        mut on_chunk: impl FnMut(Array2<f32>) -> Result<()>,
    ) -> Result<()> {
        let PromptFeed { ids, positions, image_rows, rope_delta, image_token_id } = feed;
        if positions.dim() != (3, ids.len()) {
            bail!("positions of shape {:?} for {} tokens", positions.dim(), ids.len());
        }
        let pads = ids.iter().filter(|&&t| t == image_token_id).count();
        if pads != image_rows.nrows() {
            bail!("{pads} <|image_pad|> tokens but {} rows of image features", image_rows.nrows());
        }
        let offset = self.past_len as i64 + self.rope_delta;
        let (mut start, mut row) = (0, 0);
        for part in ids.chunks(chunk.max(1)) {
            let n = part.iter().filter(|&&t| t == image_token_id).count();
            let pos = positions.slice(ndarray::s![.., start..start + part.len()]).mapv(|p| p + offset);
            let rows = image_rows.slice(ndarray::s![row..row + n, ..]);
            let logits = self.forward_with(part, Some(pos.view()), Some(rows), which)?;
            start += part.len();
            row += n;
            on_chunk(logits)?;
        }
        self.rope_delta += rope_delta;
        Ok(())
    }

    /// Prefills `ids` in chunks of `chunk` tokens; returns the logits of the last token.
    /// After each chunk `on_chunk(done, n)` learns that `done` tokens of `ids` are in the state,
    /// the last `n` computed just now; it may abort the prefill by returning an error.
    pub fn prefill(
        &mut self,
        ids: &[u32],
        chunk: usize,
        mut on_chunk: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let chunk = chunk.max(1);
        let mut last = Vec::new();
        let mut done = 0;
        for part in ids.chunks(chunk) {
            let l = self.forward(part, Logits::Last)?;
            last = l.row(0).to_vec();
            done += part.len();
            on_chunk(done, part.len())?;
        }
        Ok(last)
    }

    /// [`Self::prefill`] of a new sequence that survives a crash: every `every` tokens (rounded
    /// up to whole chunks) the state is saved to `checkpoint`, and a later call with the same
    /// model, ids and chunk size resumes from the saved point instead of token 0. The result is
    /// bit-identical to an uninterrupted prefill; the checkpoint is removed when the prefill
    /// completes. `on_chunk` is called as in [`Self::prefill`], and first with `(resumed, 0)`
    /// when a checkpoint supplied the first `resumed` tokens. [`last_checkpoint`] says where the
    /// largest checkpoint of a prefill from token 0 falls.
    pub fn prefill_resumable(
        &mut self,
        ids: &[u32],
        chunk: usize,
        checkpoint: &Path,
        every: usize,
        mut on_chunk: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Resumed> {
        let chunk = chunk.max(1);
        self.reset()?;
        let mut start = 0;
        if checkpoint.is_file() {
            match Snapshot::load(checkpoint) {
                // Resume only at a chunk boundary strictly inside this prompt with the same prefix:
                // the last chunk must still run to produce the logits.
                Ok(s)
                    if s.tokens > 0
                        && s.tokens < ids.len()
                        && s.tokens % chunk == 0
                        && s.prefix_sha256 == ids_digest(&ids[..s.tokens]) =>
                {
                    match self.restore(&s) {
                        Ok(()) => {
                            tracing::info!(
                                "resuming prefill at token {} of {} from {}",
                                s.tokens,
                                ids.len(),
                                checkpoint.display()
                            );
                            start = s.tokens;
                        }
                        Err(e) => tracing::warn!("{}: not resuming: {e:#}", checkpoint.display()),
                    }
                }
                Ok(_) => {
                    tracing::warn!("{}: checkpoint is for another prompt or chunk size; starting over", checkpoint.display())
                }
                Err(e) => tracing::warn!("{}: unreadable checkpoint, starting over: {e:#}", checkpoint.display()),
            }
        }
        let resumed_at = start;
        if resumed_at > 0 {
            on_chunk(resumed_at, 0)?;
        }
        let stride = checkpoint_stride(chunk, every);
        let mut since_save = 0;
        let mut saved_bytes = 0;
        let mut last = Vec::new();
        for part in ids[start..].chunks(chunk) {
            last = self.forward(part, Logits::Last)?.row(0).to_vec();
            start += part.len();
            since_save += part.len();
            if stride > 0 && since_save >= stride && start < ids.len() {
                let mut snap = self.snapshot()?;
                snap.prefix_sha256 = ids_digest(&ids[..start]);
                snap.save(checkpoint)?;
                saved_bytes = snap.bytes();
                since_save = 0;
            }
            on_chunk(start, part.len())?;
        }
        if checkpoint.is_file() {
            std::fs::remove_file(checkpoint)
                .with_context(|| format!("{}: cannot remove finished checkpoint", checkpoint.display()))?;
        }
        Ok(Resumed { logits: last, resumed_at, checkpoint_bytes: saved_bytes })
    }
}

/// A prompt with images for [`Decoder::prefill_prompt`].
pub struct PromptFeed<'a> {
    /// Token ids, image pads expanded.
    pub ids: &'a [u32],
    /// Rotary positions `[3, ids.len()]` relative to the prompt's start.
    pub positions: ndarray::ArrayView2<'a, i64>,
    /// Vision features of the `<|image_pad|>` tokens, in order.
    pub image_rows: ndarray::ArrayView2<'a, f32>,
    /// The prompt's position offset, kept for the tokens that follow.
    pub rope_delta: i64,
    /// Which id is `<|image_pad|>`.
    pub image_token_id: u32,
}

/// A state the decoder carries from call to call.
enum Carried {
    /// A DeltaNet layer's conv or recurrent state: each call returns the next one whole.
    Whole(DynValue),
    /// An attention layer's keys or values, `[1, P, heads, head_dim]` position-major: each call
    /// returns only its own rows, appended here, so the cache is neither copied nor moved while
    /// it stays within its reservation.
    Rows { data: StateData, heads: usize, head_dim: usize },
}

impl Carried {
    /// Shape and element type, as the next call reads it.
    fn layout(&self) -> Result<(Vec<usize>, Elem)> {
        match self {
            Self::Whole(v) => state_layout(v),
            Self::Rows { data, heads, head_dim } => {
                Ok((vec![1, data.len() / (heads * head_dim), *heads, *head_dim], data.elem()))
            }
        }
    }

    /// Shape and a copy of the values.
    fn copy(&self) -> Result<(Vec<usize>, StateData)> {
        match self {
            Self::Whole(v) => copy_state(v),
            Self::Rows { data, .. } => Ok((self.layout()?.0, data.clone())),
        }
    }

    /// The value as the next call's input; a cache is lent, not copied.
    fn input(&self) -> Result<SessionInputValue<'_>> {
        let shape = self.layout()?.0;
        Ok(match self {
            Self::Whole(v) => v.into(),
            Self::Rows { data: StateData::F32(v), .. } => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
            Self::Rows { data: StateData::F16(v), .. } => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
            Self::Rows { data: StateData::Bf16(v), .. } => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
        })
    }
}

/// Appends a call's rows (an attention output) to a cache, growing it by a quarter when full
/// rather than doubling it, so an unreserved sequence overshoots its memory by little.
fn append(cache: &mut StateData, rows: &DynValue) -> Result<()> {
    fn push<T: Copy>(cache: &mut Vec<T>, rows: &[T]) {
        let need = cache.len() + rows.len();
        if need > cache.capacity() {
            cache.reserve_exact(need + need / 4 - cache.len());
        }
        cache.extend_from_slice(rows);
    }
    match cache {
        StateData::F32(c) => push(c, rows.try_extract_tensor::<f32>()?.1),
        StateData::F16(c) => push(c, rows.try_extract_tensor::<half::f16>()?.1),
        StateData::Bf16(c) => push(c, rows.try_extract_tensor::<half::bf16>()?.1),
    }
    Ok(())
}

/// Makes room for `additional` more elements without over-allocating.
fn reserve_exact(cache: &mut StateData, additional: usize) {
    match cache {
        StateData::F32(c) => c.reserve_exact(additional),
        StateData::F16(c) => c.reserve_exact(additional),
        StateData::Bf16(c) => c.reserve_exact(additional),
    }
}

/// Replaces a cache's rows with `saved`'s (same element type, checked by the caller), keeping
/// its allocation when it is large enough.
fn overwrite(cache: &mut StateData, saved: &StateData) {
    fn copy<T: Copy>(cache: &mut Vec<T>, saved: &[T]) {
        cache.clear();
        cache.extend_from_slice(saved);
    }
    match (cache, saved) {
        (StateData::F32(c), StateData::F32(s)) => copy(c, s),
        (StateData::F16(c), StateData::F16(s)) => copy(c, s),
        (StateData::Bf16(c), StateData::Bf16(s)) => copy(c, s),
        (c, s) => *c = s.clone(),
    }
}

/// Shape and a copy of the values of a carried state tensor.
fn copy_state(v: &DynValue) -> Result<(Vec<usize>, StateData)> {
    let (shape, elem) = state_layout(v)?;
    let data = match elem {
        Elem::F32 => StateData::F32(v.try_extract_tensor::<f32>()?.1.to_vec()),
        Elem::F16 => StateData::F16(v.try_extract_tensor::<half::f16>()?.1.to_vec()),
        Elem::Bf16 => StateData::Bf16(v.try_extract_tensor::<half::bf16>()?.1.to_vec()),
    };
    Ok((shape, data))
}

/// Shape and element type of a carried state tensor, without copying it.
fn state_layout(v: &DynValue) -> Result<(Vec<usize>, Elem)> {
    match v.dtype() {
        ort::value::ValueType::Tensor { ty, shape, .. } => {
            let elem = match ty {
                ort::value::TensorElementType::Float32 => Elem::F32,
                ort::value::TensorElementType::Float16 => Elem::F16,
                ort::value::TensorElementType::Bfloat16 => Elem::Bf16,
                other => bail!("state tensor of {other}: the graph carries f32, f16 or bf16 state"),
            };
            Ok((shape.iter().map(|&d| d as usize).collect(), elem))
        }
        other => Err(anyhow!("state value is a {other}, not a tensor")),
    }
}

/// A graph input holding `data` with `shape`.
fn state_value(shape: &[usize], data: StateData) -> Result<DynValue> {
    Ok(match data {
        StateData::F32(v) => Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), v)?)?.into_dyn(),
        StateData::F16(v) => Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), v)?)?.into_dyn(),
        StateData::Bf16(v) => Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), v)?)?.into_dyn(),
    })
}

/// Result of [`Decoder::prefill_resumable`].
#[derive(Clone, Debug)]
pub struct Resumed {
    /// Logits of the last prompt token.
    pub logits: Vec<f32>,
    /// Token the prefill resumed from (0 = from the start).
    pub resumed_at: usize,
    /// Size of each checkpoint written (the disk cost of resumability), bytes; 0 if none.
    pub checkpoint_bytes: usize,
}

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Seed of the sampler's random stream: the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Seeded token sampler.
pub struct Sampler {
    cfg: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `cfg`, seeded with `cfg.seed`.
    pub fn new(cfg: Sampling) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    /// Picks a token from `logits` (only the first `vocab_limit` entries are real tokens).
    pub fn pick(&mut self, logits: &[f32], vocab_limit: usize) -> u32 {
        let logits = &logits[..vocab_limit.min(logits.len())];
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / self.cfg.temperature)).collect();
        // Order by logit (ties by id) only as far as the filters need: a full sort of 248K
        // candidates per token would cost a good part of a decode step.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.cfg.top_k > 0 && self.cfg.top_k < cand.len() {
            cand.select_nth_unstable_by(self.cfg.top_k - 1, order);
            cand.truncate(self.cfg.top_k);
        }
        if self.cfg.top_p < 1.0 || self.cfg.top_k > 0 {
            cand.sort_unstable_by(order);
        }
        let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let mut probs: Vec<f32> = cand.iter().map(|&(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|&p| {
                acc += p;
                acc >= self.cfg.top_p
            });
            let keep = keep.map(|k| k + 1).unwrap_or(probs.len());
            probs.truncate(keep);
            cand.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r: f32 = self.rng.random_range(0.0..1.0);
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Tokens covered by the last checkpoint that [`Decoder::prefill_resumable`] writes for a prompt
/// of `prompt` tokens prefilled from the start in chunks of `chunk`, saving every `every` tokens
/// (0 when it writes none). Saves fall on multiples of `every` rounded up to whole chunks and
/// never at the prompt's end, so this is the largest snapshot the prefill holds.
pub fn last_checkpoint(prompt: usize, chunk: usize, every: usize) -> usize {
    match checkpoint_stride(chunk.max(1), every) {
        0 => 0,
        stride => prompt.saturating_sub(1) / stride * stride,
    }
}

/// Tokens between two checkpoints: `every` rounded up to whole chunks (0: no checkpoints).
fn checkpoint_stride(chunk: usize, every: usize) -> usize {
    every.div_ceil(chunk) * chunk
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Limits and choices of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Stop after this many generated tokens.
    pub max_new_tokens: usize,
    /// Prompt tokens per prefill call (bounds activation memory, not the result).
    pub prefill_chunk: usize,
    /// How tokens are chosen.
    pub sampling: Sampling,
    /// Tokens that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Make the prefill resumable: checkpoint file and interval in tokens.
    pub checkpoint: Option<(std::path::PathBuf, usize)>,
}

/// What a generation did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (stop token excluded).
    pub generated_tokens: usize,
    /// Why generation ended: `max_new_tokens` or `stop token <id>`.
    pub stopped_by: String,
    /// Wall time of the prefill.
    #[serde(with = "secs")]
    pub prefill_time: Duration,
    /// Wall time of the decode loop.
    #[serde(with = "secs")]
    pub decode_time: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Restricts which tokens may come next (constrained decoding).
pub trait TokenFilter {
    /// Sets the logits of tokens that may not come next to −∞.
    fn mask(&mut self, logits: &mut [f32]) -> Result<()>;
    /// Records the token that was chosen.
    fn accept(&mut self, token: u32) -> Result<()>;
}

/// Decodes from the logits of the last prompt token until a stop token or the token limit;
/// `filter` (if any) masks every step; `on_token` sees every generated token and may abort by
/// returning an error. Returns the tokens and why generation ended.
pub fn decode(
    dec: &mut Decoder,
    mut logits: Vec<f32>,
    opts: &GenerateOptions,
    mut filter: Option<&mut dyn TokenFilter>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, String)> {
    let vocab_limit = crate::tokenizer::SPECIAL_START as usize + crate::tokenizer::SPECIALS.len();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut out = Vec::new();
    while out.len() < opts.max_new_tokens {
        if let Some(f) = filter.as_deref_mut() {
            f.mask(&mut logits)?;
        }
        let tok = sampler.pick(&logits, vocab_limit);
        if opts.stop_tokens.contains(&tok) {
            return Ok((out, format!("stop token {tok}")));
        }
        if let Some(f) = filter.as_deref_mut() {
            f.accept(tok)?;
        }
        out.push(tok);
        on_token(tok)?;
        if out.len() == opts.max_new_tokens {
            break;
        }
        logits = dec.forward(&[tok], Logits::Last)?.row(0).to_vec();
    }
    Ok((out, "max_new_tokens".into()))
}

/// Prefills `prompt` and decodes until a stop token or the token limit; `on_token` sees every
/// generated token (stop tokens excluded) as it is produced.
pub fn generate(
    dec: &mut Decoder,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    dec.reserve(dec.tokens() + prompt.len() + opts.max_new_tokens);
    let t0 = Instant::now();
    // Prompts of several chunks take seconds to minutes on a CPU: report progress.
    let mut progress = (prompt.len() > opts.prefill_chunk).then(|| Progress::new(prompt.len() as u64, "prefill"));
    let tick = |done: usize, _: usize| {
        if let Some(p) = progress.as_mut() {
            p.reach(done as u64);
        }
        Ok(())
    };
    let logits = match &opts.checkpoint {
        Some((path, every)) => {
            let r = dec.prefill_resumable(prompt, opts.prefill_chunk, path, *every, tick)?;
            if r.checkpoint_bytes > 0 {
                tracing::info!("prefill checkpoints: {} bytes each, every {every} tokens", r.checkpoint_bytes);
            }
            r.logits
        }
        None => dec.prefill(prompt, opts.prefill_chunk, tick)?,
    };
    if let Some(p) = &progress {
        p.finish();
    }
    stats.prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let (out, stopped_by) = decode(dec, logits, opts, None, on_token)?;
    stats.stopped_by = stopped_by;
    stats.decode_time = t1.elapsed();
    stats.generated_tokens = out.len();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_checkpoint_falls_before_the_prompt_end_on_whole_chunks() {
        // The 262K run of benches/RESULTS.md: saves at 65,536, 131,072 and 196,608, not at the end.
        assert_eq!(last_checkpoint(262_144, 512, 65_536), 196_608);
        assert_eq!(last_checkpoint(262_145, 512, 65_536), 262_144);
        // An interval that is not a whole number of chunks is rounded up to one.
        assert_eq!(last_checkpoint(5000, 512, 1000), 4096);
        assert_eq!(last_checkpoint(1024, 512, 1024), 0);
        assert_eq!(last_checkpoint(4096, 512, 0), 0);
    }

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut g = Sampler::new(Sampling::default());
        assert_eq!(g.pick(&logits, 4), 1);
        let cfg = Sampling { temperature: 1.0, top_k: 3, top_p: 0.95, seed: 42 };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..32).map(|_| s.pick(&logits, 4)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..32).map(|_| s.pick(&logits, 4)).collect()
        };
        assert_eq!(a, b);
        // top_k = 3 never yields the least likely token.
        assert!(a.iter().all(|&t| t != 3));
        // Temperature only (no top-k/top-p): follows the distribution without sorting it.
        let mut s = Sampler::new(Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 });
        let picks: Vec<u32> = (0..2000).map(|_| s.pick(&[0.0, 3.0, 0.0, -5.0], 4)).collect();
        let share = picks.iter().filter(|&&t| t == 1).count() as f64 / picks.len() as f64;
        // softmax([0, 3, 0, -5])[1] = 0.909
        assert!((share - 0.909).abs() < 0.03, "token 1 drawn {share}");
        // vocab_limit masks padded vocabulary entries.
        assert_eq!(g.pick(&[0.0, 1.0, 9.0], 2), 1);
    }
}
