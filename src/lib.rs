//! deltadoc: folders of documents to structured JSON with a local long-context Qwen3.5 model on
//! ONNX Runtime, whose Gated DeltaNet layers run as deltadoc's own operators.
//!
//! Data flows one way: model folders are written by [`model`] (import or synth) and executed by
//! [`generate`] through [`runtime`] sessions with the [`ops`] domain registered.

#![warn(missing_docs)]

pub mod bench;
pub mod fetch;
pub mod generate;
pub mod model;
pub mod onnx;
pub mod ops;
pub mod progress;
pub mod runtime;
pub mod snapshot;
pub mod tokenizer;
