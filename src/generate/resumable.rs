//! Crash-safe prefill: the state saved every so many tokens, and resumed from the last save.

use std::path::Path;

use anyhow::{Context, Result};

use super::{Decoder, Logits};
use crate::snapshot::{Snapshot, ids_digest};

impl Decoder {
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
}
