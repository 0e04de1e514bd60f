//! `deltadoc generate` and `deltadoc tokenize`: one chat turn through the model, and the ids the
//! template and tokenizer make of a text.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{Outcome, mib};
use crate::chat::{self, Message, Role};
use crate::generate::{DEFAULT_PREFILL_CHUNK, DecodeOptions, Decoder, Prefill, Sampling};
use crate::model::ModelDir;
use crate::runtime::SessionOptions;
use crate::tokenizer::STOP_TOKENS;

#[derive(Args)]
pub(super) struct GenerateArgs {
    /// Model folder (from `model import` or `model synth`).
    #[arg(long)]
    model: PathBuf,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    /// Longest reply in tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the k likeliest tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the likeliest tokens whose probabilities add up to p (1 = no limit).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Let the model think before answering (off by default).
    #[arg(long)]
    think: bool,
    /// Tokens per prefill call: longer calls run faster and hold larger activations.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print timing statistics to stderr at the end.
    #[arg(long)]
    stats: bool,
    /// Make a long prefill resumable: save the state to this file every --checkpoint-every
    /// tokens; rerunning the same command after a crash resumes from it.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Tokens between checkpoints.
    #[arg(long, default_value_t = 8192)]
    checkpoint_every: usize,
}

/// What `deltadoc tokenize` takes.
#[derive(Args)]
pub(super) struct TokenizeArgs {
    /// Model folder (from `model import` or `model synth`).
    #[arg(long)]
    model: PathBuf,
    /// Wrap the text in the chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// Thinking mode for --chat.
    #[arg(long)]
    think: bool,
    /// The text to tokenize.
    text: String,
}

/// `deltadoc tokenize`: the ids as JSON.
pub(super) fn tokenize(t: TokenizeArgs) -> Result<Outcome> {
    let tok = ModelDir::open(&t.model)?.tokenizer()?;
    let ids = if t.chat {
        chat::text_prompt(&tok, &[Message { role: Role::User, content: t.text }], t.think)?
    } else {
        tok.encode(&t.text)?
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(Outcome::Success)
}

/// `deltadoc generate`: the reply streamed to stdout as it is generated.
pub(super) fn generate(g: GenerateArgs) -> Result<Outcome> {
    let m = ModelDir::open(&g.model)?;
    let tok = m.tokenizer()?;
    let mut messages = Vec::new();
    if let Some(s) = g.system {
        messages.push(Message { role: Role::System, content: s });
    }
    messages.push(Message { role: Role::User, content: g.prompt });
    let prompt = chat::text_prompt(&tok, &messages, g.think)?;
    let mut dec = Decoder::open(&m, &SessionOptions::with_threads(g.threads))?;
    let prefill = Prefill { chunk: g.prefill_chunk, checkpoint: g.checkpoint.map(|p| (p, g.checkpoint_every)) };
    let opts = DecodeOptions {
        max_new_tokens: g.max_new_tokens,
        sampling: Sampling { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed: g.seed },
        stop_tokens: STOP_TOKENS.to_vec(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut pending: Vec<u8> = Vec::new();
    let (_, stats) = crate::generate::generate(&mut dec, &prompt, &prefill, &opts, |t| {
        pending.extend(tok.token_bytes(t));
        // Print the longest valid UTF-8 prefix; a character split across tokens waits.
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        stdout.write_all(&String::from_utf8_lossy(&pending[..valid]).into_owned().into_bytes())?;
        stdout.flush()?;
        pending.drain(..valid);
        Ok(())
    })?;
    if !pending.is_empty() {
        stdout.write_all(String::from_utf8_lossy(&pending).as_bytes())?;
    }
    writeln!(stdout)?;
    if g.stats {
        let pf = stats.prompt_tokens as f64 / stats.prefill_time.as_secs_f64().max(1e-9);
        let dc = stats.generated_tokens as f64 / stats.decode_time.as_secs_f64().max(1e-9);
        eprintln!(
            "prompt {} tokens ({pf:.1} tok/s), generated {} tokens ({dc:.1} tok/s), stopped by {}; KV + state {:.1} MiB",
            stats.prompt_tokens,
            stats.generated_tokens,
            stats.stopped_by,
            mib(dec.state_bytes() as u64)
        );
    }
    Ok(Outcome::Success)
}
