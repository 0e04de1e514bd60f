//! How many tokens of document text one model call can take: the pipeline's context, capped
//! by the memory plan under `memory_budget`, minus what the largest stage needs around the
//! document (its prompt and its output); and how many calls decode together within that plan.

use std::ops::Range;

use super::Context;
use crate::failure::{Failure, Reason};
use crate::stage::{self, Stage, Stop, TextStage};

/// The budget; warns when the memory plan caps the context, fails when nothing fits.
pub(super) fn tokens(ctx: &Context, stages: &[(&Stage, &dyn TextStage)], warnings: &mut Vec<String>) -> Result<usize, Stop> {
    let model = &*ctx.runner.model;
    let mut context = ctx.pipeline.spec.context.max_tokens.min(model.info().max_context);
    // Several stages keep the document's prefill for one another: the plan counts that copy.
    let snapshot = stages.len() > 1;
    let budget = ctx.limits.memory_budget;
    let mib = |b: u64| b >> 20;
    match model.max_context_within(budget, snapshot) {
        None => {
            let msg = format!(
                "the model needs {} MiB even for a minimal context, over memory_budget {} MiB",
                mib(model.planned_bytes(1, snapshot)),
                mib(budget)
            );
            return Err(Failure::new(Reason::TooLarge, "chunk", msg).into());
        }
        Some(fit) if fit < context => {
            warnings.push(format!(
                "memory_budget {} MiB caps the context at {fit} tokens ({context} tokens would need {} MiB)",
                mib(budget),
                mib(model.planned_bytes(context, snapshot))
            ));
            context = fit;
        }
        Some(_) => {}
    }
    let reserve = reserves(ctx, stages)?.into_iter().max().unwrap_or(0);
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

/// Tokens each stage needs in a context besides the document.
pub(super) fn reserves(ctx: &Context, stages: &[(&Stage, &dyn TextStage)]) -> Result<Vec<usize>, Stop> {
    let tok = ctx.runner.model.tokenizer();
    let need = |s: &dyn TextStage| {
        stage::reserve(s, tok).map_err(|e| Failure::new(Reason::Model, "chunk", format!("tokenizer: {e:#}")).into())
    };
    stages.iter().map(|(_, s)| need(*s)).collect()
}

/// Splits calls of `contexts[i]` tokens each, in order, into runs decoded together: at most
/// `max_batch` calls, and as many as the memory plan of the run's longest context holds with
/// one more sequence's cache and state for each call (one call alone fits: [`tokens`] planned
/// it). `snapshot`: calls keep their document's prefill for one another.
pub(super) fn batches(ctx: &Context, contexts: &[usize], snapshot: bool) -> Vec<Range<usize>> {
    let model = &*ctx.runner.model;
    let fits = |run: &[usize]| {
        let longest = run.iter().copied().max().unwrap_or(0);
        let extra = run.len() as u64 * model.sequence_bytes(longest);
        model.planned_bytes(longest, snapshot).saturating_add(extra) <= ctx.limits.memory_budget
    };
    let mut runs = Vec::new();
    let mut start = 0;
    for end in 1..=contexts.len() {
        let run = &contexts[start..end];
        if run.len() > 1 && (run.len() > ctx.limits.max_batch || !fits(run)) {
            runs.push(start..end - 1);
            start = end - 1;
        }
    }
    if start < contexts.len() {
        runs.push(start..contexts.len());
    }
    runs
}
