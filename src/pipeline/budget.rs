//! How many tokens of document text one model call can take: the pipeline's context, capped
//! by the memory plan under `memory_budget`, minus what the largest stage needs around the
//! document (its prompt and its output); and how many calls decode at once within that plan.

use super::Context;
use crate::failure::{Failure, Reason};
use crate::stage::{self, Stage, Stop, TextStage};

/// What one call of a document can hold.
pub(super) struct Budget {
    /// Tokens of document text.
    pub tokens: usize,
    /// Tokens each text stage needs besides the document, in the pipeline's order.
    pub reserves: Vec<usize>,
}

/// The budget; warns when the memory plan caps the context, fails when nothing fits.
pub(super) fn plan(ctx: &Context, stages: &[(&Stage, &dyn TextStage)], warnings: &mut Vec<String>) -> Result<Budget, Stop> {
    let model = &*ctx.runner.model;
    let mut context = ctx.pipeline.spec.context.max_tokens.min(model.info().max_context);
    // Several stages keep the document's prefill for one another: the plan counts that copy.
    let snapshot = stages.len() > 1;
    let budget = ctx.limits.memory_budget;
    let mib = |b: u64| b >> 20;
    let name = match ctx.limits.documents {
        1 => "memory_budget".to_string(),
        n => format!("the share of memory_budget for one of {n} documents in flight (worker.max_docs),"),
    };
    match model.max_context_within(budget, snapshot) {
        None => {
            let msg = format!(
                "the model needs {} MiB even for a minimal context, over {name} {} MiB",
                mib(model.planned_bytes(1, snapshot)),
                mib(budget)
            );
            return Err(Failure::new(Reason::TooLarge, "chunk", msg).into());
        }
        Some(fit) if fit < context => {
            warnings.push(format!(
                "{name} {} MiB caps the context at {fit} tokens ({context} tokens would need {} MiB)",
                mib(budget),
                mib(model.planned_bytes(context, snapshot))
            ));
            context = fit;
        }
        Some(_) => {}
    }
    let reserves = reserves(ctx, stages)?;
    let reserve = reserves.iter().copied().max().unwrap_or(0);
    if reserve + 256 > context {
        let msg = format!(
            "pipeline {:?}: a context of {context} tokens leaves no room for document text after the instructions and \
             max_new_tokens ({reserve} tokens)",
            ctx.pipeline.name()
        );
        return Err(Failure::new(Reason::Truncated, "chunk", msg).into());
    }
    Ok(Budget { tokens: context - reserve, reserves })
}

/// Tokens each stage needs in a context besides the document.
fn reserves(ctx: &Context, stages: &[(&Stage, &dyn TextStage)]) -> Result<Vec<usize>, Stop> {
    let tok = ctx.runner.model.tokenizer();
    let need = |s: &dyn TextStage| {
        stage::reserve(s, tok).map_err(|e| Failure::new(Reason::Model, "chunk", format!("tokenizer: {e:#}")).into())
    };
    stages.iter().map(|(_, s)| need(*s)).collect()
}

/// How many calls of `contexts[i]` tokens each decode at once: at most `max_batch`, and as many
/// as the memory plan of the longest context holds with one more sequence's cache and state for
/// each (one call alone fits: [`plan`] planned it). `snapshot`: calls keep their document's
/// prefill for one another.
pub(super) fn width(ctx: &Context, contexts: &[usize], snapshot: bool) -> usize {
    let model = &*ctx.runner.model;
    let longest = contexts.iter().copied().max().unwrap_or(0);
    let room = ctx.limits.memory_budget.saturating_sub(model.planned_bytes(longest, snapshot));
    let each = model.sequence_bytes(longest).max(1);
    let fit = usize::try_from(room / each).unwrap_or(usize::MAX);
    fit.min(ctx.limits.max_batch).min(contexts.len()).max(1)
}
