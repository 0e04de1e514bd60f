//! Chat prompts with images (docs/model.md, "Positions" and "Chat template"): the template with
//! `<|vision_start|><|image_pad|>…<|vision_end|>` per image, each pad run expanded to the image's
//! token count, and the 3-axis rotary positions of the reference's `get_rope_index`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::RgbImage;
use ndarray::Array2;
use serde::Deserialize;

use super::preprocess::{self, ImageOptions, Preprocessed};
use crate::chat::{ChatPrompt, ImageTokens, Role};
use crate::model::vision::VisionConfig;
use crate::tokenizer::Tokenizer;

/// One item of a message's content.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    /// Text, rendered as is.
    Text {
        /// The text.
        text: String,
    },
    /// An image file (relative paths resolve against the messages file's folder).
    Image {
        /// The image file.
        path: PathBuf,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One chat message.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// Its items in order.
    pub content: Vec<Part>,
}

/// Reads chat messages from JSON: `[{"role": "user", "content": "text" | [{"type": "text",
/// "text": …}, {"type": "image", "path": …}]}]`.
pub fn read_messages(path: &Path) -> Result<Vec<ChatMessage>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        role: String,
        content: Content,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let raw: Vec<Raw> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of {{\"role\", \"content\"}} messages whose content is text or a list of \
             {{\"type\": \"text\", \"text\"}} / {{\"type\": \"image\", \"path\"}} items",
            path.display()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let role = Role::parse(&m.role).with_context(|| format!("{}: message {i}", path.display()))?;
        let content = match m.content {
            Content::Text(text) => vec![Part::Text { text }],
            Content::Parts(parts) => parts
                .into_iter()
                .map(|p| match p {
                    Part::Image { path } => Part::Image { path: base.join(path) },
                    t => t,
                })
                .collect(),
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// A templated prompt ready for the decoder.
#[derive(Clone, Debug)]
pub struct Prompt {
    /// Token ids, each image's pads expanded.
    pub ids: Vec<u32>,
    /// Rotary positions `[3, ids.len()]` (T, H, W).
    pub positions: Array2<i64>,
    /// The images in prompt order.
    pub images: Vec<Preprocessed>,
    /// Position of the next token minus the token count (the reference's `rope_delta`, ≤ 0).
    pub rope_delta: i64,
}

/// Renders `messages` with the Qwen3.5 chat template (thinking on or off), reading every image
/// with `load` (the command line decodes them in an isolated child) and preprocessing it.
pub fn build(
    tok: &Tokenizer,
    cfg: &VisionConfig,
    messages: &[ChatMessage],
    thinking: bool,
    opts: &ImageOptions,
    load: &dyn Fn(&Path) -> Result<RgbImage>,
) -> Result<Prompt> {
    let mut images = Vec::new();
    for part in messages.iter().flat_map(|m| &m.content) {
        if let Part::Image { path } = part {
            let img = load(path)?;
            images
                .push(preprocess::preprocess(&img, cfg, opts).with_context(|| format!("{}: cannot preprocess", path.display()))?);
        }
    }
    render(tok, cfg, messages, thinking, images)
}

/// [`build`] with the images already preprocessed (one per image part, in order).
pub fn render(
    tok: &Tokenizer,
    cfg: &VisionConfig,
    messages: &[ChatMessage],
    thinking: bool,
    images: Vec<Preprocessed>,
) -> Result<Prompt> {
    let placeholder = ImageTokens { start: cfg.vision_start_token_id, pad: cfg.image_token_id, end: cfg.vision_end_token_id };
    let mut next_image = images.iter();
    let mut p = ChatPrompt::new(tok);
    for m in messages {
        p.open(m.role);
        for part in &m.content {
            match part {
                Part::Text { text } => p.text(text),
                Part::Image { path } => {
                    let img = next_image.next().with_context(|| format!("{}: no preprocessed image", path.display()))?;
                    p.image(placeholder, img.tokens(cfg.spatial_merge_size))?;
                }
            }
        }
        p.close()?;
    }
    let ids = p.finish(thinking)?;
    let (positions, rope_delta) = positions(&ids, &images, cfg)?;
    Ok(Prompt { ids, positions, images, rope_delta })
}

/// The reference's `get_rope_index` for images: text runs count up on all three axes; an image
/// of grid (t, gh, gw) takes T = p, H = p + row, W = p + column over its merged grid, and the
/// next text starts at p + max(gh, gw) / merge.
pub fn positions(ids: &[u32], images: &[Preprocessed], cfg: &VisionConfig) -> Result<(Array2<i64>, i64)> {
    let m = cfg.spatial_merge_size;
    let mut pos = Array2::<i64>::zeros((3, ids.len()));
    let mut p: i64 = 0;
    let mut i = 0;
    let mut imgs = images.iter();
    while i < ids.len() {
        if ids[i] != cfg.image_token_id {
            for a in 0..3 {
                pos[[a, i]] = p;
            }
            p += 1;
            i += 1;
            continue;
        }
        let img = imgs.next().context("more <|image_pad|> runs in the prompt than images")?;
        let [t, gh, gw] = img.grid;
        let (lh, lw) = (gh / m, gw / m);
        let count = t * lh * lw;
        if ids[i..].len() < count || ids[i..i + count].iter().any(|&x| x != cfg.image_token_id) {
            bail!("an image of {count} tokens has a shorter <|image_pad|> run in the prompt");
        }
        for k in 0..count {
            let (tt, r, c) = (k / (lh * lw), (k / lw) % lh, k % lw);
            pos[[0, i + k]] = p + tt as i64;
            pos[[1, i + k]] = p + r as i64;
            pos[[2, i + k]] = p + c as i64;
        }
        p += lh.max(lw) as i64;
        i += count;
    }
    if imgs.next().is_some() {
        bail!("fewer <|image_pad|> runs in the prompt than images");
    }
    let max = pos.iter().copied().max().unwrap_or(-1);
    Ok((pos, max + 1 - ids.len() as i64))
}
