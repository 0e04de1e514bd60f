//! The Qwen3.5 chat template: the one place prompts are rendered, for plain chats (`generate`,
//! `tokenize --chat`), prompts with images (`ocr`, `model logits --messages`) and stage prompts
//! (a document followed by an instruction). docs/model.md, "Chat template", gives the template
//! and why the rules below reproduce its token ids.
//!
//! A turn is `<|im_start|>{role}\n{content}<|im_end|>\n`, its content trimmed as a whole. The
//! template is text, so the role header and the content's text are tokenised as one run; items
//! that are not text (image placeholders, already tokenised document text) end a run, and the
//! text after them starts a new one, as the reference's special tokens split its text. A stage
//! prompt relies on this: its document is tokenised once, alone, so every stage and the token
//! budget see the same ids, and every stage's prompt starts with the same prefix.

use anyhow::{Result, bail};

use crate::tokenizer::{IM_END, IM_START, THINK, THINK_END, Tokenizer};

/// Who speaks in a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Instructions ahead of the conversation.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role as the template writes it.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// The role named `name` (`system`, `user` or `assistant`).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => bail!("role {other:?} (expected system, user or assistant)"),
        })
    }
}

/// A text-only message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

/// The special tokens that stand for one image: `<|vision_start|>`, `<|image_pad|>` repeated
/// once per image token, `<|vision_end|>` (ids from the model's vision configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageTokens {
    /// `<|vision_start|>`.
    pub start: u32,
    /// `<|image_pad|>`.
    pub pad: u32,
    /// `<|vision_end|>`.
    pub end: u32,
}

/// A prompt being rendered, turn by turn.
pub struct ChatPrompt<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    /// Text not yet tokenised: the role header (until an item that is not text) and the text.
    text: String,
    /// Bytes of `text` that are the role header, which the turn's trimming never touches.
    header: usize,
    /// No content item yet in this turn (the first text is trimmed at its start).
    at_start: bool,
}

impl<'t> ChatPrompt<'t> {
    /// An empty prompt.
    pub fn new(tok: &'t Tokenizer) -> Self {
        Self { tok, ids: Vec::new(), text: String::new(), header: 0, at_start: true }
    }

    /// Opens a turn of `role`.
    pub fn open(&mut self, role: Role) {
        self.ids.push(IM_START);
        self.text = format!("{}\n", role.name());
        self.header = self.text.len();
        self.at_start = true;
    }

    /// Adds text to the open turn.
    pub fn text(&mut self, text: &str) {
        self.text.push_str(if self.at_start { text.trim_start() } else { text });
        self.at_start = false;
    }

    /// Adds ids tokenised elsewhere (a document chunk) as they are.
    pub fn tokens(&mut self, ids: &[u32]) -> Result<()> {
        self.flush()?;
        self.ids.extend_from_slice(ids);
        self.at_start = false;
        Ok(())
    }

    /// Adds the placeholder of an image of `count` tokens.
    pub fn image(&mut self, tokens: ImageTokens, count: usize) -> Result<()> {
        self.flush()?;
        self.ids.push(tokens.start);
        self.ids.extend(std::iter::repeat_n(tokens.pad, count));
        self.ids.push(tokens.end);
        self.at_start = false;
        Ok(())
    }

    /// Ids rendered so far; text added since the last item that was not text is not counted
    /// until the turn closes.
    pub fn rendered(&self) -> usize {
        self.ids.len()
    }

    /// Closes the open turn, trimming the end of its content.
    pub fn close(&mut self) -> Result<()> {
        let keep = self.header.max(self.text.trim_end().len());
        self.text.truncate(keep);
        self.flush()?;
        self.ids.push(IM_END);
        self.ids.extend(self.tok.encode("\n")?);
        Ok(())
    }

    /// The prompt, ending with the assistant's header; with `thinking` off the empty think
    /// block `<think>\n\n</think>\n\n` follows it.
    pub fn finish(mut self, thinking: bool) -> Result<Vec<u32>> {
        self.ids.push(IM_START);
        self.ids.extend(self.tok.encode("assistant\n")?);
        self.ids.push(THINK);
        if thinking {
            self.ids.extend(self.tok.encode("\n")?);
        } else {
            self.ids.extend(self.tok.encode("\n\n")?);
            self.ids.push(THINK_END);
            self.ids.extend(self.tok.encode("\n\n")?);
        }
        Ok(self.ids)
    }

    fn flush(&mut self) -> Result<()> {
        if !self.text.is_empty() {
            self.ids.extend(self.tok.encode(&self.text)?);
            self.text.clear();
        }
        self.header = 0;
        Ok(())
    }
}

/// The prompt of a text-only conversation.
pub fn text_prompt(tok: &Tokenizer, messages: &[Message], thinking: bool) -> Result<Vec<u32>> {
    let mut p = ChatPrompt::new(tok);
    for m in messages {
        p.open(m.role);
        p.text(&m.content);
        p.close()?;
    }
    p.finish(thinking)
}

/// A stage prompt: one user turn holding `document` (already tokenised) and then the
/// instruction. Returned split where the document ends, so stages that share the document
/// share the first part.
pub fn stage_prompt(tok: &Tokenizer, document: &[u32], instruction: &str, thinking: bool) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut p = ChatPrompt::new(tok);
    p.open(Role::User);
    p.tokens(document)?;
    let split = p.rendered();
    p.text(&format!("\n\n{}", instruction.trim()));
    p.close()?;
    let mut ids = p.finish(thinking)?;
    let suffix = ids.split_off(split);
    Ok((ids, suffix))
}
