//! Several sequences decoded in one step: one call of the decoder graph with a batch row per
//! sequence, so the weights are read once for all of them (a decode step is bound by reading
//! them, docs/model.md, "State and memory").
//!
//! The batch holds each state as the graph reads it, batch rows side by side, so a step copies
//! nothing in: the DeltaNet states `[B, …]` come back whole from each call, and the attention
//! caches are `[B, capacity, heads, head_dim]`, row b's first `tokens` positions its own (the
//! graph's `past_lengths`), each step's new rows written after them in place. Sequences join as
//! snapshots of single sequences (after their own prefills, which differ in length) and leave as
//! they finish.

use std::borrow::Cow;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array2, Array3};
use ort::value::DynValue;

use super::carried::{Carried, copy_state, lend, state_value};
use super::decoder::{Call, Decoder};
use crate::model::graph::present_name;
use crate::model::state::{Elem, StateData};
use crate::snapshot::{Snapshot, StateTensor};

/// Sequences decoded together, one batch row each.
pub struct Batch {
    /// Per row: tokens in the sequence and its rotary offset (see [`Decoder`]).
    rows: Vec<Row>,
    /// (graph input name, state of every row) in the decoder's order.
    state: Vec<(String, Slot)>,
    /// Positions each row of an attention cache has room for.
    capacity: usize,
    /// [`crate::model::Manifest::identity`] of the model.
    identity: String,
}

#[derive(Clone, Copy, Debug)]
struct Row {
    tokens: usize,
    rope_delta: i64,
}

enum Slot {
    /// A DeltaNet state, `[B, …]`.
    Whole(DynValue),
    /// An attention cache, `[B, capacity, heads, head_dim]`; `width` values a position.
    Rows { data: StateData, heads: usize, head_dim: usize },
}

impl Slot {
    fn width(heads: usize, head_dim: usize) -> usize {
        heads * head_dim
    }
}

impl Batch {
    /// A batch of the sequences `members` (snapshots of `dec`'s model, one sequence each), with
    /// room in the attention caches for `room` more tokens a sequence before they grow. Each
    /// snapshot's tensors are freed as they are copied in, so building the batch holds little
    /// more than the snapshots did (the memory plan counts one copy a sequence,
    /// [`crate::model::plan::Footprint::sequence_bytes`]).
    pub fn new(dec: &Decoder, mut members: Vec<Snapshot>, room: usize) -> Result<Batch> {
        if members.is_empty() {
            bail!("a batch needs at least one sequence");
        }
        for (i, m) in members.iter().enumerate() {
            dec.check(m, &format!("sequence {i} of the batch"))?;
        }
        let mut state = Vec::with_capacity(dec.state.len());
        for (name, current) in &dec.state {
            let (mut shape, elem) = current.layout()?;
            let slot = match current {
                Carried::Whole(_) => {
                    shape[0] = 0;
                    Slot::Whole(state_value(&shape, StateData::zeros(elem, 0))?)
                }
                Carried::Rows { heads, head_dim, .. } => {
                    Slot::Rows { data: StateData::zeros(elem, 0), heads: *heads, head_dim: *head_dim }
                }
            };
            state.push((name.clone(), slot));
        }
        let mut batch = Batch { rows: Vec::new(), state, capacity: 0, identity: dec.identity.clone() };
        let capacity = members.iter().map(|m| m.tokens).max().unwrap_or(0) + room.max(1);
        batch.relayout(&[], capacity, &mut members)?;
        Ok(batch)
    }

    /// Sequence `member` (a snapshot of one sequence, after its own prefill) joins the batch as
    /// its last row, with room for `room` more tokens; the sequences already in the batch go on
    /// from where they are. Its tensors are freed as they are copied in.
    pub fn join(&mut self, dec: &Decoder, mut member: Snapshot, room: usize) -> Result<()> {
        dec.check(&member, &format!("sequence {} of the batch", self.rows.len()))?;
        let capacity = self.capacity.max(member.tokens + room.max(1));
        let all: Vec<usize> = (0..self.rows.len()).collect();
        self.relayout(&all, capacity, std::slice::from_mut(&mut member))
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether every sequence has left.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Tokens consumed so far by sequence `i`.
    pub fn tokens(&self, i: usize) -> usize {
        self.rows[i].tokens
    }

    /// Feeds one token to every sequence (`tokens[i]` to row i) and returns each row's logits
    /// `[B, vocab]`; `rows` as for [`Decoder::forward_rows`], the same for every sequence (the
    /// union of what each may take: each masks its own).
    pub fn step(&mut self, dec: &mut Decoder, tokens: &[u32], rows: &[u32]) -> Result<Array2<f32>> {
        let b = self.rows.len();
        if tokens.len() != b {
            bail!("{} tokens for a batch of {b} sequences", tokens.len());
        }
        if self.identity != dec.identity {
            bail!("the batch belongs to model {}, the decoder runs {}", self.identity, dec.identity);
        }
        let longest = self.rows.iter().map(|r| r.tokens).max().unwrap_or(0);
        if longest + 1 > dec.cfg.max_position_embeddings {
            bail!("sequence of {} tokens exceeds the model's context of {} tokens", longest + 1, dec.cfg.max_position_embeddings);
        }
        if longest + 1 > self.capacity {
            self.grow(longest + 1 + longest.div_ceil(4))?;
        }
        let call = Call {
            ids: Array2::from_shape_fn((b, 1), |(i, _)| tokens[i] as i64),
            positions: Array3::from_shape_fn((3, b, 1), |(_, i, _)| self.rows[i].tokens as i64 + self.rows[i].rope_delta),
            lengths: self.rows.iter().map(|r| r.tokens as i64).collect(),
            index: vec![0],
            image_embeds: Array2::zeros((0, dec.cfg.hidden_size)),
            rows,
        };
        let capacity = self.capacity;
        let state = self.state.iter().map(|(name, slot)| {
            let value = match slot {
                Slot::Whole(v) => v.into(),
                Slot::Rows { data, heads, head_dim } => lend(data, vec![b, capacity, *heads, *head_dim])?,
            };
            Ok((name.clone(), value))
        });
        let (logits, mut out) = call.run(&mut dec.session, dec.head_rows, state)?;
        for (name, slot) in &mut self.state {
            let present = present_name(name);
            let value = out.remove(&present).with_context(|| format!("graph has no output {present}"))?;
            match slot {
                Slot::Whole(v) => *v = value,
                Slot::Rows { data, heads, head_dim } => {
                    let w = Slot::width(*heads, *head_dim);
                    let (_, new) = copy_state(&value).with_context(|| format!("graph output {present}"))?;
                    for (i, r) in self.rows.iter().enumerate() {
                        data.copy_from((i * capacity + r.tokens) * w, &new, i * w..(i + 1) * w)
                            .ok_or_else(|| anyhow!("graph output {present} does not fit the batch's cache"))?;
                    }
                }
            }
        }
        for r in &mut self.rows {
            r.tokens += 1;
        }
        Ok(logits)
    }

    /// Sequence `i` alone, as [`Decoder::restore`] takes it (to go on by itself, or to check it).
    pub fn snapshot(&self, i: usize) -> Result<Snapshot> {
        let r = self.rows[i];
        let tensors = self
            .state
            .iter()
            .map(|(name, slot)| {
                let (shape, data, range) = match slot {
                    Slot::Whole(v) => {
                        let (mut shape, data) = copy_state(v)?;
                        let n = data.len() / shape[0];
                        shape[0] = 1;
                        (shape, Cow::Owned(data), i * n..(i + 1) * n)
                    }
                    Slot::Rows { data, heads, head_dim } => {
                        let w = Slot::width(*heads, *head_dim);
                        let at = i * self.capacity * w;
                        (vec![1, r.tokens, *heads, *head_dim], Cow::Borrowed(data), at..at + r.tokens * w)
                    }
                };
                let mut one = StateData::zeros(data.elem(), range.len());
                one.copy_from(0, &data, range).context("copying a sequence out of the batch")?;
                Ok(StateTensor { name: name.clone(), shape, data: one })
            })
            .collect::<Result<_>>()?;
        Ok(Snapshot {
            model: self.identity.clone(),
            tokens: r.tokens,
            rope_delta: r.rope_delta,
            prefix_sha256: String::new(),
            tensors,
        })
    }

    /// Sequence `i` leaves the batch (it finished); the rows after it move up by one.
    pub fn remove(&mut self, i: usize) -> Result<()> {
        if i >= self.rows.len() {
            bail!("no sequence {i} in a batch of {}", self.rows.len());
        }
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&k| k != i).collect();
        self.relayout(&keep, self.capacity, &mut [])
    }

    /// Room for `capacity` positions a row in the attention caches.
    fn grow(&mut self, capacity: usize) -> Result<()> {
        let all: Vec<usize> = (0..self.rows.len()).collect();
        self.relayout(&all, capacity, &mut [])
    }

    /// Rebuilds every state with the rows `keep`, in that order, then the sequences `joining`
    /// (checked by [`Decoder::check`]; their tensors are taken), at `capacity` positions a row.
    /// One state at a time, so the rebuild holds one extra state of the batch at most.
    fn relayout(&mut self, keep: &[usize], capacity: usize, joining: &mut [Snapshot]) -> Result<()> {
        let b = keep.len() + joining.len();
        for (k, (_, slot)) in self.state.iter_mut().enumerate() {
            let taken: Vec<StateTensor> = joining
                .iter_mut()
                .map(|m| {
                    let empty = StateTensor { name: String::new(), shape: Vec::new(), data: StateData::zeros(Elem::F32, 0) };
                    std::mem::replace(&mut m.tensors[k], empty)
                })
                .collect();
            match slot {
                Slot::Whole(v) => {
                    let (mut shape, data) = copy_state(v)?;
                    // Values a sequence: the shape past the batch dimension.
                    let n: usize = shape[1..].iter().product();
                    let mut kept = StateData::zeros(data.elem(), b * n);
                    for (to, &from) in keep.iter().enumerate() {
                        kept.copy_from(to * n, &data, from * n..(from + 1) * n).context("moving a sequence's state")?;
                    }
                    for (to, t) in (keep.len()..).zip(&taken) {
                        kept.copy_from(to * n, &t.data, 0..n).context("copying a sequence's state")?;
                    }
                    shape[0] = b;
                    *v = state_value(&shape, kept)?;
                }
                Slot::Rows { data, heads, head_dim } => {
                    let w = Slot::width(*heads, *head_dim);
                    let mut kept = StateData::zeros(data.elem(), b * capacity * w);
                    for (to, &from) in keep.iter().enumerate() {
                        let at = from * self.capacity * w;
                        kept.copy_from(to * capacity * w, data, at..at + self.rows[from].tokens * w)
                            .context("moving a sequence's cache")?;
                    }
                    for (to, t) in (keep.len()..).zip(&taken) {
                        kept.copy_from(to * capacity * w, &t.data, 0..t.data.len()).context("copying a sequence's cache")?;
                    }
                    *data = kept;
                }
            }
        }
        let mut rows: Vec<Row> = keep.iter().map(|&i| self.rows[i]).collect();
        rows.extend(joining.iter().map(|m| Row { tokens: m.tokens, rope_delta: m.rope_delta }));
        self.rows = rows;
        self.capacity = capacity;
        Ok(())
    }
}
