//! deltadoc's numerical kernels, free of ONNX Runtime: the gated delta rule ([`gated_delta`]), the
//! depthwise causal conv ([`conv`]) and blockwise causal attention ([`attention`]), with the SIMD
//! helpers they share ([`simd`]).
//!
//! A crate of their own so that test and debug builds compile them optimised (a profile
//! override in the workspace's Cargo.toml): unoptimised, their vectorised loops run scalar and
//! the tests' model runs crawl. The ORT operator glue is `deltadoc::ops`.

pub mod attention;
pub mod conv;
pub mod gated_delta;
mod gemm;
pub mod simd;
