//! One document through its pipeline: detect → extract (isolated) → page stages (OCR) → chunk
//! (token-exact, within the memory plan) → text stages, map-reduce over the chunks → the
//! result. The stages are [`crate::stage`]'s; this module runs them in order and keeps the
//! document's books (timings, token totals, warnings).

mod budget;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use self::budget::Budget;
use crate::chunk::{self, Chunked};
use crate::config::Pipeline;
use crate::extract::isolated::Extraction;
use crate::extract::{Extracted, Method};
use crate::failure::{Failure, Reason};
use crate::output::{DocResult, PageResult, PipelineRef, Source, StageResult, TokenTotals};
use crate::stage::{Answers, Asked, Body, Finish, PageDoc, Part, Runner, Stage, Stop, TextStage};

/// Per-document limits.
#[derive(Clone, Copy, Debug)]
pub struct DocLimits {
    /// Larger files are refused.
    pub max_file_bytes: u64,
    /// Bytes a model call may plan to use; the context is capped to fit (`too_large` if nothing fits).
    pub memory_budget: u64,
    /// Documents in flight that [`Self::memory_budget`] is one share of (1: the whole budget).
    pub documents: usize,
    /// Most model calls decoded together (the memory budget may allow fewer).
    pub max_batch: usize,
}

/// What a document run needs besides the document.
pub struct Context<'a> {
    /// The pipeline.
    pub pipeline: &'a Pipeline,
    /// Its limits.
    pub limits: DocLimits,
    /// How text is extracted.
    pub extraction: &'a Extraction,
    /// The model and the attempt's deadline, shutdown signal and callbacks.
    pub runner: Runner<'a>,
}

/// A document's books while its steps run.
#[derive(Default)]
struct Books {
    timings: BTreeMap<String, f64>,
    warnings: Vec<String>,
    stages: BTreeMap<String, StageResult>,
    totals: TokenTotals,
}

impl Books {
    fn stage(&mut self, name: &str, kind: &str, mut r: StageResult, duration_s: f64) {
        r.kind = kind.into();
        r.duration_s = duration_s;
        self.timings.insert(name.to_string(), duration_s);
        self.stages.insert(name.to_string(), r);
    }
}

/// Processes `source` (found at `rel` under its inbox; `sha256` when already known) and returns
/// its result.
pub fn process(ctx: &mut Context, source: &Path, rel: &Path, sha256: Option<&str>) -> Result<DocResult, Stop> {
    let t_all = Instant::now();
    let mut books = Books::default();
    let (size, sha) = timed(&mut books, "detect", |_| detect(ctx, source, sha256))?;
    ctx.runner.step("extract");
    let mut ex = timed(&mut books, "extract", |_| Ok(ctx.runner.in_child(|| ctx.extraction.text(source))?))?;
    books.warnings.append(&mut ex.warnings);
    ctx.runner.check("extract")?;
    read_pages(ctx, source, &mut ex, &mut books)?;
    ctx.runner.step("chunk");
    let (chunked, budget) = timed(&mut books, "chunk", |b| chunk(ctx, source, &ex, &mut b.warnings))?;
    let truncated = run_text_stages(ctx, &chunked, &budget, &mut books)?;
    if truncated > 0 {
        books.warnings.push(format!("{truncated} part answer(s) longer than a context were cut in the reduce step"));
    }
    books.timings.insert("total".into(), t_all.elapsed().as_secs_f64());
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
    let p = ctx.pipeline;
    Ok(DocResult {
        deltadoc_version: env!("CARGO_PKG_VERSION").into(),
        pipeline: PipelineRef { name: p.name().into(), version: p.spec.version },
        source: Source {
            path: source.to_path_buf(),
            relative_path: rel.to_path_buf(),
            sha256: sha,
            size,
            mime: ex.mime,
            encoding: ex.encoding,
        },
        pages,
        document_tokens: chunked.total_tokens,
        chunks: chunked.chunks,
        truncated: truncated > 0,
        stages: books.stages,
        model: ctx.runner.model.info().clone(),
        timings: books.timings,
        tokens: books.totals,
        warnings: books.warnings,
        processed_at: crate::output::now_rfc3339(),
        job: None,
    })
}

/// Runs `step`, recording its wall time under `name`.
fn timed<T>(books: &mut Books, name: &str, step: impl FnOnce(&mut Books) -> Result<T, Stop>) -> Result<T, Stop> {
    let t = Instant::now();
    let r = step(books)?;
    books.timings.insert(name.into(), t.elapsed().as_secs_f64());
    Ok(r)
}

/// A regular file within the size limit; its size and SHA-256.
fn detect(ctx: &mut Context, source: &Path, sha256: Option<&str>) -> Result<(u64, String), Stop> {
    ctx.runner.step("detect");
    let io = |e: std::io::Error| Failure::new(Reason::Io, "detect", format!("{}: {e}", source.display()));
    let meta = std::fs::symlink_metadata(source).map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(Failure::new(Reason::Unsupported, "detect", format!("{}: not a regular file", source.display())).into());
    }
    let max = ctx.limits.max_file_bytes;
    if meta.len() > max {
        let msg = format!("{}: {} bytes, over the limit of {max}", source.display(), meta.len());
        return Err(Failure::new(Reason::TooLarge, "detect", msg).into());
    }
    let sha = match sha256 {
        Some(s) => s.to_string(),
        None => crate::util::sha256_file(source).map_err(io)?,
    };
    Ok((meta.len(), sha))
}

/// Runs the page stage on pages without text; fails when no page has text in the end.
fn read_pages(ctx: &mut Context, source: &Path, ex: &mut Extracted, books: &mut Books) -> Result<(), Stop> {
    let image_pages: Vec<u32> = ex.pages.iter().filter(|p| p.method == Method::Ocr).map(|p| p.number).collect();
    if !image_pages.is_empty() {
        let page_stage = ctx.pipeline.stages.iter().find_map(|s| match &s.body {
            Body::Pages(p) => Some((s.name().to_string(), s.kind(), p.clone())),
            Body::Text(_) => None,
        });
        match page_stage {
            Some((name, kind, stage)) => {
                let t = Instant::now();
                let mut doc = PageDoc { source, extraction: ctx.extraction, pages: &mut ex.pages };
                let r = stage.run(&mut ctx.runner, &mut doc)?;
                // Page prompts are all prefilled: nothing of them is shared.
                books.totals.prompt += r.prompt_tokens;
                books.totals.prefilled += r.prompt_tokens;
                books.totals.generated += r.generated_tokens;
                books.stage(&name, kind, r, t.elapsed().as_secs_f64());
            }
            None => books.warnings.push(format!(
                "page(s) {image_pages:?} are images without a text layer and pipeline {:?} has no ocr stage: their text is \
                 missing",
                ctx.pipeline.name()
            )),
        }
    }
    if ex.pages.iter().all(|p| p.text.trim().is_empty()) {
        let (reason, why) = if image_pages.is_empty() {
            (Reason::Parse, "the document contains no text")
        } else {
            (Reason::Ocr, "the document has only image pages and no ocr stage to read them")
        };
        return Err(Failure::new(reason, "extract", format!("{}: {why}", source.display())).into());
    }
    Ok(())
}

/// The document's text stages.
fn text_stages(p: &Pipeline) -> Vec<(&Stage, &dyn TextStage)> {
    p.stages
        .iter()
        .filter_map(|s| match &s.body {
            Body::Text(t) => Some((s, &**t)),
            Body::Pages(_) => None,
        })
        .collect()
}

/// The document cut into chunks that fit one model call each, and that call's budget.
fn chunk(ctx: &Context, source: &Path, ex: &Extracted, warnings: &mut Vec<String>) -> Result<(Chunked, Budget), Stop> {
    let stages = text_stages(ctx.pipeline);
    let budget = budget::plan(ctx, &stages, warnings)?;
    let page_texts: Vec<(u32, &str)> = ex.pages.iter().map(|p| (p.number, p.text.as_str())).collect();
    let tok = ctx.runner.tokenizer();
    let chunked = chunk::chunk(tok, &page_texts, budget.tokens, ctx.pipeline.spec.context.overlap)
        .map_err(|e| Failure::new(Reason::Model, "chunk", format!("{}: tokenizer: {e:#}", source.display())))?;
    if chunked.chunks.len() > 1 {
        warnings.push(format!(
            "{} tokens do not fit one context of {}: processed as {} chunks with map-reduce",
            chunked.total_tokens,
            budget.tokens,
            chunked.chunks.len()
        ));
    }
    if chunked.split_paragraphs > 0 {
        warnings.push(format!("{} paragraph(s) longer than a chunk were cut between tokens", chunked.split_paragraphs));
    }
    Ok((chunked, budget))
}

/// Runs the text stages on every chunk, then has each stage finish with its answers. The calls
/// go chunk by chunk (every stage of a chunk reuses the chunk's prefill), as many decoding at
/// once as `max_batch` and the memory plan allow, each joining as soon as one ends; the reduce
/// calls the stages then ask are decoded together likewise, round by round. Returns how many
/// inputs had to be cut.
fn run_text_stages(ctx: &mut Context, chunked: &Chunked, budget: &Budget, books: &mut Books) -> Result<usize, Stop> {
    let stages = text_stages(ctx.pipeline);
    let n = chunked.chunks.len();
    // (stage, document, call) in the order they prefill.
    let mut asked = Vec::with_capacity(n * stages.len());
    for c in &chunked.chunks {
        for (si, s) in stages.iter().enumerate() {
            asked.push((si, Cow::Borrowed(&c.ids[..]), s.1.call((n > 1).then_some(Part { index: c.index + 1, of: n }))));
        }
    }
    let mut answers: Vec<Answers> =
        stages.iter().map(|_| Answers { calls: Vec::new(), from: 0, chunked, budget: budget.tokens, truncated: 0 }).collect();
    // Seconds each stage took: calls decoded together each took their batch's time, so every
    // stage in a batch counts all of it.
    let mut secs = vec![0.0; stages.len()];
    let mut results: Vec<Option<StageResult>> = stages.iter().map(|_| None).collect();
    // The chunks' calls keep the document's prefill for the next stage; a reduce call's
    // document is its own.
    let mut shared = stages.len() > 1;
    // Rounds until every stage has its result: the calls asked, then each open stage's finish.
    while results.iter().any(Option::is_none) {
        let open: Vec<bool> = results.iter().map(Option::is_none).collect();
        let t = Instant::now();
        if !asked.is_empty() {
            let contexts: Vec<usize> = asked.iter().map(|(si, ids, _)| ids.len() + budget.reserves[*si]).collect();
            let width = budget::width(ctx, &contexts, shared);
            let batch: Vec<Asked> = asked
                .iter()
                .map(|(si, ids, call)| Asked {
                    stage: stages[*si].0.name(),
                    document: ids,
                    call,
                    keep: shared && *si + 1 < stages.len(),
                })
                .collect();
            let done = ctx.runner.call_batch(&batch, width)?;
            for a in &mut answers {
                a.from = a.calls.len();
            }
            for ((si, _, _), d) in asked.drain(..).zip(done) {
                answers[si].calls.push(d);
            }
        }
        shared = false;
        let tok = ctx.runner.tokenizer();
        for (si, (_, s)) in stages.iter().enumerate().filter(|(si, _)| open[*si]) {
            match s.finish(tok, &mut answers[si])? {
                Finish::Done(r) => results[si] = Some(*r),
                Finish::Ask(groups, call) => asked.extend(groups.into_iter().map(|g| (si, Cow::Owned(g), call.clone()))),
            }
        }
        let took = t.elapsed().as_secs_f64();
        for (s, _) in secs.iter_mut().zip(&open).filter(|(_, o)| **o) {
            *s += took;
        }
    }
    let mut truncated = 0;
    for (((stage, _), answers), (r, secs)) in stages.iter().zip(answers).zip(results.into_iter().zip(secs)) {
        let mut r = r.expect("the rounds end when every stage has its result");
        truncated += answers.truncated;
        let calls = answers.calls;
        for c in &calls {
            books.totals.prompt += c.prompt_tokens;
            books.totals.prefilled += c.prefilled_tokens;
            books.totals.generated += c.generated_tokens;
        }
        r.prompt_tokens = calls.iter().map(|c| c.prompt_tokens).sum();
        r.generated_tokens = calls.iter().map(|c| c.generated_tokens).sum();
        r.calls = calls.len();
        r.stopped_by = calls.last().map(|c| c.stopped_by.clone()).unwrap_or_default();
        r.ttft_s = calls.first().map(|c| c.ttft_s);
        r.prefill_s = calls.iter().map(|c| c.prefill_s).sum();
        r.decode_s = calls.iter().map(|c| c.decode_s).sum();
        r.state_bytes = calls.iter().map(|c| c.state_bytes).max().unwrap_or(0);
        books.stage(stage.name(), stage.kind(), r, secs);
    }
    Ok(truncated)
}
