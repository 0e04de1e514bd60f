//! How many tokens of document text one model call can take: the pipeline's context, capped
//! by the memory plan under `memory_budget`, minus what the largest stage needs around the
//! document (its prompt and its output).

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
    let tok = model.tokenizer();
    let mut reserve = 0;
    for (_, s) in stages {
        let need = stage::reserve(*s, tok).map_err(|e| Failure::new(Reason::Model, "chunk", format!("tokenizer: {e:#}")))?;
        reserve = reserve.max(need);
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
