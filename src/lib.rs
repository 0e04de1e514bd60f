//! deltadoc: folders of documents to structured JSON with a local long-context Qwen3.5 model on
//! ONNX Runtime, whose Gated DeltaNet layers run as deltadoc's own operators.
//!
//! Data flows one way (docs/architecture.md has the map). For the model: folders are written by
//! [`model`] (import or synth) and executed by [`generate`] through [`runtime`] sessions with the
//! [`ops`] domain registered; [`llm`] is the model as the orchestration sees it. For documents:
//! the daemon (`daemon`) finds them in the inboxes of a [`config`]ured pipeline and records them
//! in the [`ledger`]; its worker runs each through the pipeline (`pipeline`): [`extract`], the
//! stages (`stage`) over the chunks (`chunk`), and [`output`] holds the result's format. The
//! binary is [`cli`]; only what it and the tests use is public.

#![warn(missing_docs)]

pub mod bench;
pub mod bucket;
pub mod chat;
pub(crate) mod chunk;
pub mod cli;
pub mod config;
pub mod constrain;
pub(crate) mod daemon;
pub mod extract;
pub mod failure;
pub(crate) mod fetch;
#[cfg(fuzzing)]
pub mod fuzz;
pub mod generate;
pub mod ledger;
pub mod llm;
pub mod model;
pub mod ocr;
pub mod onnx;
pub mod ops;
pub mod output;
pub(crate) mod pipeline;
pub(crate) mod progress;
pub mod runtime;
pub mod schedule;
pub mod snapshot;
pub(crate) mod stage;
pub mod tokenizer;
pub mod util;
pub mod vision;
