//! The decoder session: the ONNX Runtime graph with the state it carries between calls (KV
//! caches of the attention layers, conv and recurrent state of the DeltaNet layers), fed in
//! prefill chunks or one token at a time.

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array, Array2, Array3};
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::Tensor;

use super::carried::{Carried, append, overwrite, reserve_exact, state_value};
use crate::model::ModelDir;
use crate::model::config::{LayerKind, TextConfig};
use crate::model::graph::{HEAD_ROWS, KvCache, PAST_LENGTHS, head_takes_rows, present_name};
use crate::model::state::{Elem, StateData};
use crate::runtime::{self, Prepack, SessionOptions};
use crate::snapshot::{Snapshot, StateTensor};

/// A decoder session with its carried state (one sequence).
pub struct Decoder {
    pub(super) session: Session,
    pub(super) cfg: TextConfig,
    /// (input name, current value) for every per-layer state input.
    pub(super) state: Vec<(String, Carried)>,
    past_len: usize,
    /// Tokens the attention caches are reserved for ([`Self::reserve`]).
    reserved: usize,
    /// Rotary position of the next token minus `past_len`: 0 for text, and after an image the
    /// reference's `rope_delta` (an image advances positions by its grid side, not its tokens).
    rope_delta: i64,
    /// [`crate::model::Manifest::identity`] of the model, stamped on snapshots.
    pub(super) identity: String,
    /// Element type of the attention caches.
    kv_cache: KvCache,
    /// Whether the graph takes [`HEAD_ROWS`] (the int8/int4 heads).
    pub(super) head_rows: bool,
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
        // Nothing in the decoder graphs gains from a prepacked copy: f32 `MatMul` lost by it
        // (`Prepack`), and the int8/int4 projections run deltadoc's `QuantMatMul` on the weights
        // as stored.
        let session = runtime::open_session_with(&model.graph_path(), opts, Prepack::No)?;
        let cfg = model.manifest.config.clone();
        let identity = model.manifest.identity();
        let kv_cache = model.manifest.kv_cache;
        let head_rows = head_takes_rows(model.manifest.precision);
        let mut d =
            Self { session, cfg, state: Vec::new(), past_len: 0, reserved: 0, rope_delta: 0, identity, kv_cache, head_rows };
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

    /// Whether `snap` (`what` names it in errors) is one sequence of this decoder's model, every
    /// state tensor of the shape the decoder carries (an attention cache of its own length).
    pub(super) fn check(&self, snap: &Snapshot, what: &str) -> Result<()> {
        if snap.model != self.identity {
            bail!("{what} belongs to model {}, this decoder runs {}", snap.model, self.identity);
        }
        if snap.tensors.len() != self.state.len() {
            bail!("{what} has {} state tensors, the model has {}", snap.tensors.len(), self.state.len());
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
                bail!("tensor {} {:?} of {what} does not fit state {name} {:?}", t.name, t.shape, shape);
            }
        }
        Ok(())
    }

    /// Continues from `snap` as if the tokens it covers had just been fed; the next call's
    /// logits are exactly those of an uninterrupted run with the same call boundaries.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        self.check(snap, "snapshot")?;
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
            for s in c.layer_states(i) {
                let carried = match c.layer_kind(i) {
                    LayerKind::Full => {
                        let row = s.shape(1).iter().product::<usize>();
                        let mut data = StateData::zeros(self.kv_cache.elem(), 0);
                        reserve_exact(&mut data, self.reserved * row);
                        Carried::Rows { data, heads: c.num_key_value_heads, head_dim: c.head_dim }
                    }
                    LayerKind::Linear => {
                        let shape = s.shape(0);
                        let zeros = StateData::zeros(Elem::F32, shape.iter().product());
                        Carried::Whole(state_value(&shape, zeros)?)
                    }
                };
                self.state.push((s.name, carried));
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

    /// Whether [`Self::forward_rows`] computes only the rows asked for (the int8/int4 heads).
    pub fn head_takes_rows(&self) -> bool {
        self.head_rows
    }

    /// Feeds `ids` and returns the last position's logits `[1, vocab]`, computed only for the
    /// tokens `rows` (ascending; empty: all) where the graph can skip the others (the int8/int4
    /// heads; they come out −∞), and for every token otherwise. What a constrained step asks for:
    /// the caller masks the logits to the same tokens either way.
    pub fn forward_rows(&mut self, ids: &[u32], rows: &[u32]) -> Result<Array2<f32>> {
        self.run(ids, None, None, Logits::Last, rows)
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
        self.run(ids, positions, image_rows, which, &[])
    }

    fn run(
        &mut self,
        ids: &[u32],
        positions: Option<ndarray::ArrayView2<'_, i64>>,
        image_rows: Option<ndarray::ArrayView2<'_, f32>>,
        which: Logits,
        rows: &[u32],
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
        let call =
            Call { ids: input_ids, positions: position_ids, lengths: vec![self.past_len as i64], index, image_embeds, rows };
        let state = self.state.iter().map(|(name, v)| Ok((name.clone(), v.input()?)));
        let (logits, mut out) = call.run(&mut self.session, self.head_rows, state)?;
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
}

/// What one call of the graph takes besides the carried state.
pub(super) struct Call<'r> {
    /// `[B, S]`.
    pub ids: Array2<i64>,
    /// `[3, B, S]`.
    pub positions: Array3<i64>,
    /// Each batch row's tokens in the attention caches.
    pub lengths: Vec<i64>,
    /// Positions of each row whose logits are wanted.
    pub index: Vec<i64>,
    /// `[M, H]`.
    pub image_embeds: Array2<f32>,
    /// The head rows to compute where the graph takes them (empty: all).
    pub rows: &'r [u32],
}

impl Call<'_> {
    /// Runs the graph with `state` (input name, value) beside the call's own inputs; returns the
    /// logits `[B·N, V]` and the outputs, the states after the call among them.
    pub(super) fn run<'s, 'v>(
        self,
        session: &'s mut Session,
        head_rows: bool,
        state: impl Iterator<Item = Result<(String, SessionInputValue<'v>)>>,
    ) -> Result<(Array2<f32>, SessionOutputs<'s>)> {
        let n = self.ids.nrows() * self.index.len();
        let mut inputs: Vec<(String, SessionInputValue<'v>)> = vec![
            ("input_ids".into(), Tensor::from_array(self.ids)?.into_dyn().into()),
            ("position_ids".into(), Tensor::from_array(self.positions)?.into_dyn().into()),
            (PAST_LENGTHS.into(), Tensor::from_array(Array::from_vec(self.lengths))?.into_dyn().into()),
            ("logits_index".into(), Tensor::from_array(Array::from_vec(self.index))?.into_dyn().into()),
            ("image_embeds".into(), Tensor::from_array(self.image_embeds)?.into_dyn().into()),
        ];
        if head_rows {
            let rows = Array::from_iter(self.rows.iter().map(|&r| r as i64));
            inputs.push((HEAD_ROWS.into(), Tensor::from_array(rows)?.into_dyn().into()));
        }
        for s in state {
            inputs.push(s?);
        }
        let mut out = session.run(inputs).map_err(|e| anyhow!("decoder run failed: {e}"))?;
        let logits = out.remove("logits").context("graph has no logits output")?;
        let (shape, data) = logits.try_extract_tensor::<f32>()?;
        let v = *shape.last().unwrap_or(&0) as usize;
        Ok((Array2::from_shape_vec((n, v), data.to_vec())?, out))
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
