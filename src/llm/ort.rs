//! [`OrtModel`]: the ONNX Runtime Qwen3.5 decoder with prefix reuse, crash-safe prefill of long
//! prefixes, JSON-Schema constrained decoding, and the vision tower for page images.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use image::RgbImage;

use super::{Completion, ModelInfo, Next, OcrOptions, Request, Requests, StopCheck, TextModel, Transcription};
use crate::constrain::{Constraint, Vocabulary};
use crate::generate::{self, Decoder, Decoding, Member, TokenFilter};
use crate::model::plan::{Footprint, StateCopy};
use crate::model::vision::VisionConfig;
use crate::model::{Manifest, ModelDir};
use crate::runtime::SessionOptions;
use crate::snapshot::{Snapshot, ids_digest};
use crate::tokenizer::{STOP_TOKENS, THINK_END, Tokenizer};
use crate::vision::encoder::VisionEncoder;

/// How the model runs its calls (the daemon's `model` settings).
#[derive(Clone, Debug)]
pub struct RuntimeSettings {
    /// Prompt tokens per prefill call.
    pub prefill_chunk: usize,
    /// Folder for crash-safe prefill checkpoints of long prefixes (`None`: none are written).
    pub checkpoint_dir: Option<PathBuf>,
    /// A prefix longer than this is checkpointed every this many tokens.
    pub checkpoint_every: usize,
}

impl RuntimeSettings {
    /// Prefill calls of `prefill_chunk` tokens, no checkpoints.
    pub fn new(prefill_chunk: usize) -> Self {
        Self { prefill_chunk, checkpoint_dir: None, checkpoint_every: 16_384 }
    }

    /// With checkpoints of long prefixes in `dir`, so a restart resumes their prefill.
    pub fn with_checkpoints(self, dir: PathBuf) -> Self {
        Self { checkpoint_dir: Some(dir), ..self }
    }
}

/// The schema constraint, applied after an optional think block.
struct SchemaFilter {
    constraint: Constraint,
    /// Thinking tokens left; `None` once `</think>` was generated (or without thinking).
    thinking: Option<usize>,
}

impl TokenFilter for SchemaFilter {
    fn allowed(&mut self, out: &mut Vec<u32>) -> Result<()> {
        out.clear();
        match self.thinking {
            None => self.constraint.allowed(out)?,
            Some(0) => out.push(THINK_END),
            // Everything but the stop tokens: as good as all.
            Some(_) => {}
        }
        Ok(())
    }

    fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        match self.thinking {
            None => self.constraint.apply(logits),
            // Budget spent: end the think block now.
            Some(0) => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if i != THINK_END as usize {
                        *l = f32::NEG_INFINITY;
                    }
                }
                Ok(())
            }
            // Still thinking: anything but ending the reply before the JSON came.
            Some(_) => {
                for t in STOP_TOKENS {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                Ok(())
            }
        }
    }

    fn accept(&mut self, token: u32) -> Result<()> {
        match self.thinking {
            None => self.constraint.commit(token),
            Some(_) if token == THINK_END => {
                self.thinking = None;
                Ok(())
            }
            Some(n) => {
                self.thinking = Some(n.saturating_sub(1));
                Ok(())
            }
        }
    }
}

/// The ONNX Runtime Qwen3.5 decoder with prefix reuse.
pub struct OrtModel {
    info: ModelInfo,
    footprint: Footprint,
    tokenizer: Tokenizer,
    decoder: Decoder,
    /// The vocabulary indexed for constrained decoding (built on first use: about a second).
    vocabulary: Option<Vocabulary>,
    /// States after the last kept prefixes, with their digests, the most recently used last.
    kept: VecDeque<(String, Snapshot)>,
    /// How many prefixes [`Self::kept`] holds: one per document in flight.
    keep: usize,
    settings: RuntimeSettings,
    /// The vision graph and how to open it; opened on the first page image.
    vision: Option<(VisionConfig, PathBuf)>,
    encoder: Option<VisionEncoder>,
    session: SessionOptions,
}

impl OrtModel {
    /// Loads a model folder.
    pub fn open(dir: &ModelDir, opts: &SessionOptions, settings: RuntimeSettings) -> Result<Self> {
        Ok(Self {
            info: model_info(&dir.manifest),
            footprint: Footprint::of(dir),
            tokenizer: dir.tokenizer()?,
            decoder: Decoder::open(dir, opts)?,
            vocabulary: None,
            kept: VecDeque::new(),
            keep: 1,
            settings,
            vision: dir.vision().ok().map(|(c, p)| (c.clone(), p)),
            encoder: None,
            session: opts.clone(),
        })
    }

    fn state_copy(&self, context: usize, snapshot: bool) -> StateCopy {
        let s = &self.settings;
        let every = s.checkpoint_dir.as_ref().map(|_| s.checkpoint_every);
        state_copy(context, s.prefill_chunk, snapshot, every)
    }

    /// Prefills `req`'s whole prompt, its prefix from the kept state where it can: the logits of
    /// the last prompt token and the prompt tokens computed.
    fn prefill_request(&mut self, req: &Request) -> Result<(Vec<f32>, usize)> {
        let total = req.prefix.len() + req.suffix.len();
        if total >= self.info.max_context {
            bail!("prompt of {total} tokens does not fit the model context of {}", self.info.max_context);
        }
        self.decoder.reserve(total + req.options.max_new_tokens);
        let (mut logits, mut prefilled) = self.prefill_prefix(req)?;
        if !req.suffix.is_empty() {
            logits = self.decoder.prefill(req.suffix, self.settings.prefill_chunk, |_, n| {
                (req.on_prefill)(n);
                (req.check)()
            })?;
            prefilled += req.suffix.len();
        }
        Ok((logits, prefilled))
    }

    /// The constraint `req` asks for (its schema after its think block), if any.
    fn filter_for(&mut self, req: &Request) -> Result<Option<SchemaFilter>> {
        let Some(schema) = req.schema else { return Ok(None) };
        if self.vocabulary.is_none() {
            self.vocabulary = Some(Vocabulary::new(&self.tokenizer)?);
        }
        let constraint = self.vocabulary.as_ref().map(|v| v.constraint(schema)).transpose()?;
        Ok(constraint.map(|constraint| SchemaFilter { constraint, thinking: req.think_budget }))
    }

    /// What `req` produced: the reply of the tokens `ids`, and the call's figures.
    fn completion(
        &self,
        req: &Request,
        ids: Vec<u32>,
        stopped_by: String,
        filter: Option<SchemaFilter>,
        prefilled: usize,
        times: Times,
    ) -> Result<Completion> {
        let raw = self.tokenizer.decode(&ids)?;
        let reasoning = match (req.think_budget, raw.find("</think>")) {
            (Some(_), Some(at)) => Some(raw[..at].trim().to_string()),
            _ => None,
        };
        let (mask_s, mask_steps) = filter.map_or((0.0, 0), |f| (f.constraint.mask_time.as_secs_f64(), f.constraint.steps));
        Ok(Completion {
            reasoning,
            mask_s,
            mask_steps,
            text: clean_reply(&raw),
            prompt_tokens: req.prefix.len() + req.suffix.len(),
            prefilled_tokens: prefilled,
            generated_tokens: ids.len(),
            stopped_by,
            ttft_s: times.ttft.as_secs_f64(),
            prefill_s: times.prefill_s,
            decode_s: times.decode_s,
            state_bytes: self.decoder.state_bytes(),
        })
    }

    /// Prefills `req` and lets it join `decoding` as `id`.
    fn start(&mut self, req: &Request, id: usize, decoding: &mut Decoding<SchemaFilter>) -> Result<Started> {
        let asked = Instant::now();
        let (logits, prefilled) = self.prefill_request(req)?;
        let filter = self.filter_for(req)?;
        let member = Member { logits, opts: req.options.clone(), filter };
        decoding.join(&self.decoder, id, member, self.decoder.snapshot()?)?;
        Ok(Started { prefilled, prefill_s: asked.elapsed().as_secs_f64(), asked, joined: Instant::now(), ttft: None })
    }

    fn prefill_prefix(&mut self, req: &Request) -> Result<(Vec<f32>, usize)> {
        let digest = ids_digest(req.prefix);
        if let Some(at) = self.kept.iter().position(|(d, _)| *d == digest) {
            let hit = self.kept.remove(at).expect("position found it");
            self.decoder.restore(&hit.1)?;
            self.kept.push_back(hit);
            return Ok((Vec::new(), 0));
        }
        // Freed before the prefill, so the plan's one kept copy a document holds.
        while self.kept.len() >= self.keep {
            self.kept.pop_front();
        }
        // Only computed tokens count: a prefix restored from a checkpoint reports 0.
        let tick = |_: usize, n: usize| {
            (req.on_prefill)(n);
            (req.check)()
        };
        // Long prefixes get a checkpoint so a crash or restart resumes instead of starting over.
        let RuntimeSettings { prefill_chunk, checkpoint_every, .. } = self.settings;
        let logits = match &self.settings.checkpoint_dir {
            Some(dir) if resumable(req.prefix.len(), checkpoint_every) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("{}.ddsnap", &digest[..16]));
                self.decoder.prefill_resumable(req.prefix, prefill_chunk, &path, checkpoint_every, tick)?.logits
            }
            _ => {
                self.decoder.reset()?;
                self.decoder.prefill(req.prefix, prefill_chunk, tick)?
            }
        };
        if req.keep_prefix {
            self.kept.push_back((digest, self.decoder.snapshot()?));
        }
        Ok((logits, req.prefix.len()))
    }
}

impl TextModel for OrtModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn complete(&mut self, req: &Request) -> Result<Completion> {
        let t0 = Instant::now();
        let (logits, prefilled) = self.prefill_request(req)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut filter = self.filter_for(req)?;
        let mut ttft = None;
        let t1 = Instant::now();
        let (ids, stopped_by) =
            generate::decode(&mut self.decoder, logits, req.options, filter.as_mut().map(|f| f as &mut dyn TokenFilter), |_| {
                ttft.get_or_insert_with(|| t0.elapsed());
                (req.check)()
            })?;
        let times = Times { prefill_s, ttft: ttft.unwrap_or(Duration::ZERO), decode_s: t1.elapsed().as_secs_f64() };
        self.completion(req, ids, stopped_by, filter, prefilled, times)
    }

    fn complete_batch(
        &mut self,
        reqs: &[Request],
        width: usize,
        done: &mut dyn FnMut(usize, &Completion),
    ) -> Result<Vec<Completion>> {
        // One request decodes faster alone than as a batch of one.
        let width = if reqs.len() < 2 { 1 } else { width };
        super::complete_listed(self, reqs, width, done)
    }

    fn serve(&mut self, requests: &mut dyn Requests, width: usize) -> Result<()> {
        self.keep = requests.documents().max(1);
        if width < 2 {
            return super::serve_in_turn(self, requests);
        }
        // Each prompt prefilled by itself (a shared prefix once, kept) when a row is free, then
        // decoded with the others until it ends.
        let mut decoding = Decoding::new();
        let mut running: HashMap<usize, Started> = HashMap::new();
        let mut ending = false;
        loop {
            while !ending && decoding.len() < width {
                match requests.next(decoding.is_empty()) {
                    Next::Start(id) => match self.start(&requests.request(id), id, &mut decoding) {
                        Ok(s) => {
                            running.insert(id, s);
                        }
                        Err(e) => requests.done(id, Err(e)),
                    },
                    Next::Run(work) => work(self),
                    Next::Later => break,
                    Next::End => ending = true,
                }
            }
            if decoding.is_empty() {
                if ending {
                    return Ok(());
                }
                continue;
            }
            // Requests whose caller gave up (timeout, shutdown, lost lease) leave; the rest go on.
            let ids: Vec<usize> = decoding.ids().collect();
            for id in ids {
                if let Err(e) = (requests.request(id).check)() {
                    decoding.leave(id)?;
                    running.remove(&id);
                    requests.done(id, Err(e));
                }
            }
            let step = decoding.step(&mut self.decoder, |id, _| {
                if let Some(s) = running.get_mut(&id) {
                    s.ttft.get_or_insert_with(|| s.asked.elapsed());
                }
                Ok(())
            });
            let ended = match step {
                Ok(ended) => ended,
                Err(e) => {
                    // The batch's state is unknown after a failed step: every row fails with it.
                    let why = format!("{e:#}");
                    for id in decoding.ids().collect::<Vec<_>>() {
                        requests.done(id, Err(anyhow!("{why}")));
                    }
                    (decoding, running) = (Decoding::new(), HashMap::new());
                    continue;
                }
            };
            for e in ended {
                let Some(s) = running.remove(&e.id) else { continue };
                let times = Times {
                    prefill_s: s.prefill_s,
                    ttft: s.ttft.unwrap_or(Duration::ZERO),
                    decode_s: s.joined.elapsed().as_secs_f64(),
                };
                let reply = self.completion(&requests.request(e.id), e.tokens, e.why, e.filter, s.prefilled, times);
                requests.done(e.id, reply);
            }
        }
    }

    fn planned_bytes(&self, context: usize, snapshot: bool) -> u64 {
        self.footprint.plan(context, self.settings.prefill_chunk, self.state_copy(context, snapshot)).total_bytes
    }

    fn sequence_bytes(&self, context: usize) -> u64 {
        self.footprint.sequence_bytes(context)
    }

    fn max_context_within(&self, budget: u64, snapshot: bool) -> Option<usize> {
        let copy = |t| self.state_copy(t, snapshot);
        self.footprint.max_context_within(budget, self.info.max_context, self.settings.prefill_chunk, copy)
    }

    fn transcribe(&mut self, page: &RgbImage, label: &str, opts: &OcrOptions, check: StopCheck) -> Result<Transcription> {
        let encoder = match &mut self.encoder {
            Some(e) => e,
            None => {
                let Some((cfg, path)) = &self.vision else {
                    bail!("model {} has no vision tower (imported text-only), so image pages cannot be read", self.info.name)
                };
                self.encoder.insert(VisionEncoder::from_graph(path, cfg, &self.session)?)
            }
        };
        crate::ocr::transcribe(&mut self.decoder, encoder, &self.tokenizer, page, opts, self.settings.prefill_chunk, label, check)
    }
}

/// A call's times: its prefill, its first token since the call began, its decode.
struct Times {
    prefill_s: f64,
    ttft: Duration,
    decode_s: f64,
}

/// A request decoding in [`OrtModel::serve`]: what its completion will report.
struct Started {
    /// Prompt tokens computed.
    prefilled: usize,
    prefill_s: f64,
    /// When it started (its prefill).
    asked: Instant,
    /// When it joined the batch.
    joined: Instant,
    /// Its first token came this long after it started.
    ttft: Option<Duration>,
}

/// Drops a leftover think block and surrounding whitespace from a reply.
fn clean_reply(text: &str) -> String {
    let t = match text.find("</think>") {
        Some(at) => &text[at + "</think>".len()..],
        None => text,
    };
    t.trim().to_string()
}

/// Whether a prefix of `tokens` is prefilled resumably, with a checkpoint every `every` tokens.
fn resumable(tokens: usize, every: usize) -> bool {
    tokens > every
}

/// The copy of the decoder state a context of `context` tokens holds beside its cache, as
/// [`OrtModel::prefill_prefix`] makes them: the kept prefix when stages share it (never smaller
/// than a checkpoint of it), otherwise a long prefix's last checkpoint (`checkpoint_every`:
/// `None` when checkpoints are off), which late in a 262K prefill outweighs the cache it copies.
fn state_copy(context: usize, chunk: usize, snapshot: bool, checkpoint_every: Option<usize>) -> StateCopy {
    match checkpoint_every {
        _ if snapshot => StateCopy::Kept(context),
        Some(every) if resumable(context, every) => StateCopy::Checkpoint(generate::last_checkpoint(context, chunk, every)),
        _ => StateCopy::None,
    }
}

/// What results say about the model of this manifest.
fn model_info(m: &Manifest) -> ModelInfo {
    ModelInfo {
        name: m.identity(),
        source: m.source.clone(),
        precision: m.precision.name().into(),
        random_weights: m.is_synthetic(),
        max_context: m.config.max_position_embeddings,
        vision: m.vision_config.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_counts_the_copy_the_prefill_makes() {
        // Stages sharing a prefix keep all of it, checkpoints or not.
        assert_eq!(state_copy(262_144, 512, true, Some(16_384)), StateCopy::Kept(262_144));
        assert_eq!(state_copy(8192, 512, true, None), StateCopy::Kept(8192));
        // One stage: a prefix past the interval checkpoints, the last time on the chunk boundary
        // before its end.
        assert_eq!(state_copy(262_144, 512, false, Some(16_384)), StateCopy::Checkpoint(245_760));
        assert_eq!(state_copy(16_385, 512, false, Some(16_384)), StateCopy::Checkpoint(16_384));
        // A prefix within the interval, or checkpoints off: no copy.
        assert_eq!(state_copy(16_384, 512, false, Some(16_384)), StateCopy::None);
        assert_eq!(state_copy(262_144, 512, false, None), StateCopy::None);
    }
}
