//! Running one document through a pipeline: detect and extract (isolated), OCR of image pages,
//! token-exact chunking, the model stages (map-reduce when the document needs several chunks),
//! and the result.

pub mod llm;
pub mod merge;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::chunk::{self, Chunked};
use crate::config::{Pipeline, StageKind, StageSpec};
use crate::extract::isolated::{self, Isolation};
use crate::extract::{self, ExtractLimits, Extracted, Method};
use crate::failure::{Failure, Reason};
use crate::generate::Sampling;
use crate::output::{DocResult, PageResult, PipelineRef, Source, StageResult, TokenTotals};
use llm::{Completion, Request, TextModel};

/// Built-in instruction of `summarize` stages.
pub const SUMMARY_INSTRUCTION: &str = "Summarise the document above for a reader who has not seen it: what kind of document it is, \
who is involved, and the key facts, dates, amounts and obligations. Answer in the document's language.";

/// Built-in instruction of `ocr` stages.
pub const OCR_INSTRUCTION: &str = "Transcribe all text on this page exactly, in reading order.";

/// How an attempt ended other than with a result.
#[derive(Debug)]
pub enum Stop {
    /// The document failed (counts as an attempt).
    Failed(Failure),
    /// Shutdown was requested: put the job back, it did not fail.
    Interrupted,
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

/// What a document run needs besides the document.
pub struct Context<'a> {
    /// The pipeline.
    pub pipeline: &'a Pipeline,
    /// The model.
    pub model: &'a mut dyn TextModel,
    /// Run extraction in a child process with these limits (`None`: in this process).
    pub isolation: Option<&'a Isolation>,
    /// Larger files are refused.
    pub max_file_bytes: u64,
    /// PDFs with more pages are refused.
    pub max_pages: u32,
    /// Bytes a model call may plan to use; the context is capped to fit (`too_large` if nothing fits).
    pub memory_budget: u64,
    /// The attempt fails with `timeout` after this instant.
    pub deadline: Instant,
    /// Set on shutdown: the attempt stops at the next chunk or token.
    pub shutdown: &'a AtomicBool,
    /// Told when a step starts (ledger stage, progress display).
    pub on_step: &'a mut dyn FnMut(&str),
    /// Told how many prompt tokens each prefill chunk consumed.
    pub on_prefill: &'a dyn Fn(usize),
    /// Told at every interruption check (between steps, prefill chunks and tokens): the
    /// attempt is making progress.
    pub heartbeat: &'a dyn Fn(),
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::fetch::hex(&h.finalize()))
}

/// Processes `source` (found at `rel` under its inbox) and returns its result.
pub fn process(ctx: &mut Context, source: &Path, rel: &Path, sha256: Option<&str>) -> Result<DocResult, Stop> {
    let t_all = Instant::now();
    let mut timings = BTreeMap::new();
    let mut warnings = Vec::new();
    let io = |e: std::io::Error| Failure::new(Reason::Io, "detect", format!("{}: {e}", source.display()));

    (ctx.on_step)("detect");
    let t = Instant::now();
    let meta = std::fs::symlink_metadata(source).map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(Failure::new(Reason::Unsupported, "detect", format!("{}: not a regular file", source.display())).into());
    }
    if meta.len() > ctx.max_file_bytes {
        let msg = format!("{}: {} bytes, over the limit of {}", source.display(), meta.len(), ctx.max_file_bytes);
        return Err(Failure::new(Reason::TooLarge, "detect", msg).into());
    }
    let sha = match sha256 {
        Some(s) => s.to_string(),
        None => sha256_file(source).map_err(io)?,
    };
    timings.insert("detect".into(), t.elapsed().as_secs_f64());

    (ctx.on_step)("extract");
    let t = Instant::now();
    let mut ex: Extracted = match ctx.isolation {
        Some(iso) => isolated::extract(source, iso)?,
        None => extract::extract_file(source, ExtractLimits { max_pages: ctx.max_pages })?,
    };
    timings.insert("extract".into(), t.elapsed().as_secs_f64());
    warnings.append(&mut ex.warnings);
    check(ctx, "extract")?;

    let mut stages = BTreeMap::new();
    let mut totals = TokenTotals::default();
    let ocr_pages: Vec<u32> = ex.pages.iter().filter(|p| p.method == Method::Ocr).map(|p| p.number).collect();
    if !ocr_pages.is_empty() {
        match ctx.pipeline.spec.stages.iter().find(|s| s.kind == StageKind::Ocr) {
            Some(stage) => {
                (ctx.on_step)(&stage.name.value);
                let t = Instant::now();
                let (mut transcript, mut prompt_tokens, mut generated_tokens) = (Vec::new(), 0, 0);
                let opts = crate::ocr::OcrOptions {
                    image: crate::vision::preprocess::ImageOptions::default().with_token_budget(stage.max_page_tokens),
                    tile_tokens: stage.tile_tokens,
                    max_new_tokens: stage.max_new_tokens,
                    // The model runs its own prefill chunk size.
                    prefill_chunk: 0,
                    instruction: instruction(stage).to_string(),
                    save_images: None,
                };
                for &n in &ocr_pages {
                    let model = &mut *ctx.model;
                    let read = interruptible(ctx.shutdown, ctx.deadline, ctx.heartbeat, &stage.name.value, |check| {
                        model.transcribe(source, &ex.mime, n, &opts, check)
                    })?;
                    let page = read.map_err(|e| {
                        Failure::new(Reason::Ocr, stage.name.value.clone(), format!("{}: page {n}: {e:#}", source.display()))
                    })?;
                    prompt_tokens += page.prompt_tokens;
                    generated_tokens += page.generated_tokens;
                    transcript.push(page.text.clone());
                    if let Some(p) = ex.pages.iter_mut().find(|p| p.number == n) {
                        p.text = page.text;
                    }
                    check(ctx, &stage.name.value)?;
                }
                let duration_s = t.elapsed().as_secs_f64();
                timings.insert(stage.name.value.clone(), duration_s);
                totals.prompt += prompt_tokens;
                totals.prefilled += prompt_tokens;
                totals.generated += generated_tokens;
                stages.insert(
                    stage.name.value.clone(),
                    StageResult {
                        kind: "ocr".into(),
                        output: transcript.join("\n\n").into(),
                        prompt_tokens,
                        generated_tokens,
                        calls: ocr_pages.len(),
                        duration_s,
                        ..StageResult::default()
                    },
                );
            }
            None => warnings.push(format!(
                "page(s) {ocr_pages:?} are images without a text layer and pipeline {:?} has no ocr stage: their text is missing",
                ctx.pipeline.name()
            )),
        }
    }
    if ex.pages.iter().all(|p| p.text.trim().is_empty()) {
        let (reason, why) = if ocr_pages.is_empty() {
            (Reason::Parse, "the document contains no text")
        } else {
            (Reason::Ocr, "the document has only image pages and no ocr stage to read them")
        };
        return Err(Failure::new(reason, "extract", format!("{}: {why}", source.display())).into());
    }

    (ctx.on_step)("chunk");
    let t = Instant::now();
    let tok = ctx.model.tokenizer();
    let text_stages: Vec<&StageSpec> = ctx.pipeline.spec.stages.iter().filter(|s| s.kind != StageKind::Ocr).collect();
    let budget = chunk_budget(ctx, &text_stages, &mut warnings)?;
    let page_texts: Vec<(u32, &str)> = ex.pages.iter().map(|p| (p.number, p.text.as_str())).collect();
    let chunked = chunk::chunk(tok, &page_texts, budget, ctx.pipeline.spec.context.overlap)
        .map_err(|e| Failure::new(Reason::Model, "chunk", format!("{}: tokenizer: {e:#}", source.display())))?;
    timings.insert("chunk".into(), t.elapsed().as_secs_f64());
    if chunked.chunks.len() > 1 {
        warnings.push(format!(
            "{} tokens do not fit one context of {budget}: processed as {} chunks with map-reduce",
            chunked.total_tokens,
            chunked.chunks.len()
        ));
    }
    if chunked.split_paragraphs > 0 {
        warnings.push(format!("{} paragraph(s) longer than a chunk were cut between tokens", chunked.split_paragraphs));
    }

    let mut truncated = 0;
    let results = run_text_stages(ctx, &text_stages, &chunked, budget, &mut totals, &mut truncated)?;
    if truncated > 0 {
        warnings.push(format!("{truncated} part answer(s) longer than a context were cut in the reduce step"));
    }
    for (name, r) in results {
        timings.insert(name.clone(), r.duration_s);
        stages.insert(name, r);
    }
    timings.insert("total".into(), t_all.elapsed().as_secs_f64());

    let pages = ex
        .pages
        .into_iter()
        .map(|p| PageResult {
            number: p.number,
            method: p.method,
            ocr_reason: p.ocr_reason,
            tokens: chunked.page_tokens.get(&p.number).copied().unwrap_or(0),
            text: p.text,
        })
        .collect();
    Ok(DocResult {
        deltadoc_version: env!("CARGO_PKG_VERSION").into(),
        pipeline: PipelineRef { name: ctx.pipeline.name().into(), version: ctx.pipeline.spec.version },
        source: Source {
            path: source.to_path_buf(),
            relative_path: rel.to_path_buf(),
            sha256: sha,
            size: meta.len(),
            mime: ex.mime,
            encoding: ex.encoding,
        },
        pages,
        document_tokens: chunked.total_tokens,
        chunks: chunked.chunks,
        truncated: truncated > 0,
        stages,
        model: ctx.model.info().clone(),
        timings,
        tokens: totals,
        warnings,
        processed_at: crate::output::now_rfc3339(),
    })
}

/// Why the attempt must stop now (shutdown or past the deadline), if it must.
fn interruption(shutdown: &AtomicBool, deadline: Instant, stage: &str) -> Option<Stop> {
    if shutdown.load(Ordering::Relaxed) {
        return Some(Stop::Interrupted);
    }
    (Instant::now() > deadline)
        .then(|| Failure::new(Reason::Timeout, stage, "the document ran past its time limit (limits.document_timeout)").into())
}

/// Stops the attempt on timeout or shutdown.
fn check(ctx: &Context, stage: &str) -> Result<(), Stop> {
    (ctx.heartbeat)();
    interruption(ctx.shutdown, ctx.deadline, stage).map_or(Ok(()), Err)
}

/// Tokens of document text one model call can take: the context minus the largest stage
/// template, instruction and output.
fn chunk_budget(ctx: &Context, stages: &[&StageSpec], warnings: &mut Vec<String>) -> Result<usize, Stop> {
    let tok = ctx.model.tokenizer();
    let mut context = ctx.pipeline.spec.context.max_tokens.min(ctx.model.info().max_context);
    let snapshot = stages.len() > 1;
    let mib = |b: u64| b >> 20;
    match ctx.model.max_context_within(ctx.memory_budget, snapshot) {
        None => {
            let p = ctx.model.plan(1, snapshot);
            let msg = format!(
                "the model needs {} MiB even for a minimal context, over memory_budget {} MiB",
                mib(p.total_bytes),
                mib(ctx.memory_budget)
            );
            return Err(Failure::new(Reason::TooLarge, "chunk", msg).into());
        }
        Some(fit) if fit < context => {
            let p = ctx.model.plan(context, snapshot);
            warnings.push(format!(
                "memory_budget {} MiB caps the context at {fit} tokens ({context} tokens would need {} MiB)",
                mib(ctx.memory_budget),
                mib(p.total_bytes)
            ));
            context = fit;
        }
        Some(_) => {}
    }
    let mut reserve = 0;
    for s in stages {
        let instr = instruction(s);
        // Map prompts add a part header; reserve for the longest form.
        let longest = with_schema(s, format!("{} {}", map_instruction(s.kind, instr, 999, 999), instr));
        let over =
            llm::overhead_tokens(tok, &longest).map_err(|e| Failure::new(Reason::Model, "chunk", format!("tokenizer: {e:#}")))?;
        reserve = reserve.max(over + s.output_tokens());
    }
    if reserve + 256 > context {
        let msg = format!(
            "pipeline {:?}: a context of {context} tokens leaves no room for document text after the instructions and \
             max_new_tokens ({reserve} tokens)",
            ctx.pipeline.name()
        );
        return Err(Failure::new(Reason::Truncated, "chunk", msg).into());
    }
    Ok(context - reserve)
}

fn instruction(s: &StageSpec) -> &str {
    match (&s.instruction, s.kind) {
        (Some(t), _) => t.value.trim(),
        (None, StageKind::Summarize) => SUMMARY_INSTRUCTION,
        (None, StageKind::Ocr) => OCR_INSTRUCTION,
        (None, StageKind::Prompt | StageKind::Extract) => "",
    }
}

/// The instruction as the model sees it: for `extract`, followed by the schema it must follow
/// (the constraint enforces it either way; a real model answers better when it sees it).
fn with_schema(s: &StageSpec, instr: String) -> String {
    match &s.compiled {
        Some(schema) => format!("{instr}\n\nReply with one JSON object that matches this JSON Schema:\n{}", schema.value()),
        None => instr,
    }
}

fn map_instruction(kind: StageKind, instr: &str, part: usize, parts: usize) -> String {
    match kind {
        StageKind::Summarize => format!(
            "The text above is part {part} of {parts} of a longer document. Summarise this part: the key facts, dates, \
             amounts and obligations it contains."
        ),
        StageKind::Extract => format!(
            "The text above is part {part} of {parts} of a longer document. Fill the fields from this part only: use null \
             or an empty list for what it does not state.\n\nInstruction: {instr}"
        ),
        _ => format!(
            "The text above is part {part} of {parts} of a longer document. Using only this part, follow the instruction; \
             answer \"not in this part\" if the part has nothing for it.\n\nInstruction: {instr}"
        ),
    }
}

fn reduce_instruction(kind: StageKind, instr: &str) -> String {
    match kind {
        StageKind::Summarize => "The text above holds summaries of the consecutive parts of one document. Write one summary of \
                                 the whole document from them."
            .to_string(),
        _ => format!(
            "The text above holds answers to one instruction from the consecutive parts of one document. Combine them into \
             one answer to the instruction, leaving out parts that had nothing.\n\nInstruction: {instr}"
        ),
    }
}

fn sampling(s: &StageSpec) -> Sampling {
    Sampling { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p, seed: s.seed }
}

/// Runs the text stages chunk by chunk (every stage of a chunk reuses the chunk's prefill),
/// then reduces each stage's part answers.
fn run_text_stages(
    ctx: &mut Context,
    stages: &[&StageSpec],
    chunked: &Chunked,
    budget: usize,
    totals: &mut TokenTotals,
    truncated: &mut usize,
) -> Result<Vec<(String, StageResult)>, Stop> {
    let n = chunked.chunks.len();
    let mut acc: Vec<(Vec<Completion>, f64)> = stages.iter().map(|_| (Vec::new(), 0.0)).collect();
    for c in &chunked.chunks {
        for (si, s) in stages.iter().enumerate() {
            let instr = if n == 1 { instruction(s).to_string() } else { map_instruction(s.kind, instruction(s), c.index + 1, n) };
            let keep = si + 1 < stages.len();
            let t = Instant::now();
            let done = call(ctx, s, &c.ids, &instr, keep)?;
            acc[si].1 += t.elapsed().as_secs_f64();
            acc[si].0.push(done);
        }
    }
    let mut out = Vec::new();
    for (si, s) in stages.iter().enumerate() {
        let (mut calls, mut secs) = std::mem::take(&mut acc[si]);
        let mut result = match &s.compiled {
            Some(schema) => fields(s, schema, &calls, chunked)?,
            None => {
                let parts: Vec<String> = calls.iter().map(|c| c.text.clone()).collect();
                let output = if n == 1 {
                    parts[0].clone()
                } else {
                    let t = Instant::now();
                    let (text, more) = reduce(ctx, s, &parts, chunked, budget, truncated)?;
                    calls.extend(more);
                    secs += t.elapsed().as_secs_f64();
                    text
                };
                StageResult {
                    output: output.into(),
                    parts: if n > 1 { parts.into_iter().map(Into::into).collect() } else { Vec::new() },
                    ..StageResult::default()
                }
            }
        };
        for c in &calls {
            totals.prompt += c.prompt_tokens;
            totals.prefilled += c.prefilled_tokens;
            totals.generated += c.generated_tokens;
        }
        let last = calls.last().cloned().unwrap_or_default();
        result.kind = s.kind.name().into();
        result.prompt_tokens = calls.iter().map(|c| c.prompt_tokens).sum();
        result.generated_tokens = calls.iter().map(|c| c.generated_tokens).sum();
        result.calls = calls.len();
        result.stopped_by = last.stopped_by;
        result.duration_s = secs;
        result.ttft_s = calls.first().map(|c| c.ttft_s);
        result.prefill_s = calls.iter().map(|c| c.prefill_s).sum();
        result.decode_s = calls.iter().map(|c| c.decode_s).sum();
        result.state_bytes = calls.iter().map(|c| c.state_bytes).max().unwrap_or(0);
        out.push((s.name.value.clone(), result));
    }
    Ok(out)
}

/// An `extract` stage's result: each chunk's JSON parsed and validated, merged by the schema
/// (with provenance) and validated again.
fn fields(
    s: &StageSpec,
    schema: &crate::constrain::Schema,
    calls: &[Completion],
    chunked: &Chunked,
) -> Result<StageResult, Stop> {
    let stage = &s.name.value;
    let bad = |msg: String| Stop::Failed(Failure::new(Reason::Model, stage.clone(), msg));
    let mut parts = Vec::new();
    for (c, chunk) in calls.iter().zip(&chunked.chunks) {
        let v: serde_json::Value = serde_json::from_str(&c.text).map_err(|e| {
            bad(format!("chunk {}: constrained output is not JSON ({e}; stopped by {})", chunk.index, c.stopped_by))
        })?;
        schema.validate(&v).map_err(|e| bad(format!("chunk {}: {e:#}", chunk.index)))?;
        parts.push(v);
    }
    let merge_parts: Vec<merge::Part> = parts
        .iter()
        .zip(&chunked.chunks)
        .map(|(value, c)| merge::Part { value, chunk: c.index, pages: [c.first_page, c.last_page] })
        .collect();
    let (merged, provenance) = merge::merge(schema.value(), &merge_parts);
    schema.validate(&merged).map_err(|e| bad(format!("merged output of {} chunks: {e:#}", parts.len())))?;
    let mask_s: f64 = calls.iter().map(|c| c.mask_s).sum();
    let mask_steps: usize = calls.iter().map(|c| c.mask_steps).sum();
    Ok(StageResult {
        output: merged,
        parts: if parts.len() > 1 { parts } else { Vec::new() },
        schema: Some(schema.value().clone()),
        provenance: serde_json::to_value(provenance).ok(),
        reasoning: if s.keep_reasoning { calls.iter().filter_map(|c| c.reasoning.clone()).collect() } else { Vec::new() },
        mask_ms_per_token: (mask_steps > 0).then(|| 1e3 * mask_s / mask_steps as f64),
        ..StageResult::default()
    })
}

/// Combines part answers; when they do not fit one context they are reduced in groups first.
fn reduce(
    ctx: &mut Context,
    s: &StageSpec,
    parts: &[String],
    chunked: &Chunked,
    budget: usize,
    truncated: &mut usize,
) -> Result<(String, Vec<Completion>), Stop> {
    let instr = reduce_instruction(s.kind, instruction(s));
    let mut calls = Vec::new();
    let mut level: Vec<String> = parts
        .iter()
        .zip(&chunked.chunks)
        .map(|(p, c)| format!("Part {} (pages {}–{}):\n{}", c.index + 1, c.first_page, c.last_page, p.trim()))
        .collect();
    loop {
        let tok = ctx.model.tokenizer();
        let encoded: Vec<Vec<u32>> = level
            .iter()
            .map(|t| tok.encode(&format!("{t}\n\n")))
            .collect::<Result<_, _>>()
            .map_err(|e| Failure::new(Reason::Model, s.name.value.clone(), format!("tokenizer: {e:#}")))?;
        // Group consecutive answers into contexts of at most `budget` tokens.
        let mut groups: Vec<Vec<u32>> = vec![Vec::new()];
        for e in encoded {
            let e = if e.len() > budget {
                *truncated += 1;
                e[..budget].to_vec()
            } else {
                e
            };
            if groups.last().is_some_and(|g| !g.is_empty() && g.len() + e.len() > budget) {
                groups.push(Vec::new());
            }
            groups.last_mut().expect("one group").extend(e);
        }
        let mut next = Vec::new();
        for g in &groups {
            let done = call(ctx, s, g, &instr, false)?;
            next.push(done.text.clone());
            calls.push(done);
        }
        if next.len() == 1 {
            return Ok((next.pop().unwrap_or_default(), calls));
        }
        level = next;
    }
}

fn call(ctx: &mut Context, s: &StageSpec, doc: &[u32], instr: &str, keep: bool) -> Result<Completion, Stop> {
    let stage = s.name.value.clone();
    (ctx.on_step)(&stage);
    let model_err = |e: anyhow::Error| Failure::new(Reason::Model, stage.clone(), format!("{e:#}"));
    let instr = with_schema(s, instr.to_string());
    let (prefix, suffix) = llm::stage_prompt(ctx.model.tokenizer(), doc, &instr, s.thinking).map_err(model_err)?;
    let opts = llm::stage_options(s.output_tokens(), sampling(s));
    let (on_prefill, model) = (ctx.on_prefill, &mut *ctx.model);
    let result = interruptible(ctx.shutdown, ctx.deadline, ctx.heartbeat, &stage, |check| {
        model.complete(&Request {
            prefix: &prefix,
            suffix: &suffix,
            keep_prefix: keep,
            options: &opts,
            check,
            on_prefill,
            schema: s.compiled.as_ref(),
            think_budget: (s.compiled.is_some() && s.thinking).then_some(s.think_budget),
        })
    })?;
    result.map_err(|e| model_err(e).into())
}

/// Runs a model call that polls `check` between chunks and tokens. The model sees an opaque
/// error when it is told to stop; the reason (shutdown, timeout) is kept here and returned as such.
fn interruptible<T>(
    shutdown: &AtomicBool,
    deadline: Instant,
    heartbeat: &dyn Fn(),
    stage: &str,
    f: impl FnOnce(&dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<T>,
) -> Result<anyhow::Result<T>, Stop> {
    let stopped = std::cell::RefCell::new(None);
    let check = || -> anyhow::Result<()> {
        heartbeat();
        if let Some(stop) = interruption(shutdown, deadline, stage) {
            *stopped.borrow_mut() = Some(stop);
            anyhow::bail!("stopped");
        }
        Ok(())
    };
    let result = f(&check);
    match (result, stopped.take()) {
        (Err(_), Some(stop)) => Err(stop),
        (result, _) => Ok(result),
    }
}
