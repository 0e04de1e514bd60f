//! deltadoc: folders of documents to structured JSON with a local long-context Qwen3.5 model on
//! ONNX Runtime, whose Gated DeltaNet layers run as deltadoc's own operators.
//!
//! Data flows one way. For the model: folders are written by [`model`] (import or synth) and
//! executed by [`generate`] through [`runtime`] sessions with the [`ops`] domain registered. For
//! documents: [`ingest`] finds them in the inboxes of a [`config`]ured pipeline, [`store`] keeps
//! the job ledger, [`pipeline`] runs [`extract`], [`chunk`] and the model stages, [`output`]
//! writes the result; [`daemon`] ties these together with [`schedule`] and [`metrics`].

#![warn(missing_docs)]

pub mod bench;
pub mod chunk;
pub mod config;
pub mod constrain;
pub mod daemon;
pub mod extract;
pub mod failure;
pub mod fetch;
pub mod generate;
pub mod health;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod ocr;
pub mod onnx;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod runtime;
pub mod schedule;
pub mod snapshot;
pub mod store;
pub mod tokenizer;
pub mod vision;
