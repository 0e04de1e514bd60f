//! Reading images with the Qwen3.5 vision tower: preprocessing as the reference processor
//! ([`preprocess`]), the vision graph ([`encoder`]), chat prompts with images ([`prompt`]), and
//! feeding such a prompt through the decoder ([`prefill`]).

pub mod encoder;
pub mod preprocess;
pub mod prompt;

use anyhow::Result;
use ndarray::{Array2, Axis};

use crate::generate::{Decoder, Logits, PromptFeed};
use encoder::VisionEncoder;
use prompt::Prompt;

/// Encodes the prompt's images and prefills the prompt in chunks of `chunk` tokens; `on_chunk`
/// gets each chunk's logits (`which` selects the rows).
pub fn prefill(
    dec: &mut Decoder,
    enc: &mut VisionEncoder,
    prompt: &Prompt,
    chunk: usize,
    which: Logits,
    on_chunk: impl FnMut(Array2<f32>) -> Result<()>,
) -> Result<()> {
    let features = encode_all(enc, prompt)?;
    let feed = PromptFeed {
        ids: &prompt.ids,
        positions: prompt.positions.view(),
        image_rows: features.view(),
        rope_delta: prompt.rope_delta,
        image_token_id: enc.config().image_token_id,
    };
    dec.prefill_prompt(feed, chunk, which, on_chunk)
}

/// Vision features of all the prompt's images, stacked in prompt order.
pub fn encode_all(enc: &mut VisionEncoder, prompt: &Prompt) -> Result<Array2<f32>> {
    let mut parts = Vec::with_capacity(prompt.images.len());
    for img in &prompt.images {
        parts.push(enc.encode(img)?);
    }
    let width = enc.config().out_hidden_size;
    if parts.is_empty() {
        return Ok(Array2::zeros((0, width)));
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    Ok(ndarray::concatenate(Axis(0), &views)?)
}
