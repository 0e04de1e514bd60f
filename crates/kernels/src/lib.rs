//! deltadoc's numerical kernels, free of ONNX Runtime: the gated delta rule ([`gated_delta`]), the
//! depthwise causal conv ([`conv`]), blockwise causal attention ([`attention`]) and the matmul of
//! block-quantised weights ([`quant_matmul`]), with the SIMD helpers they share ([`simd`]).
//!
//! A crate of their own so that test and debug builds compile them optimised (a profile
//! override in the workspace's Cargo.toml): unoptimised, their vectorised loops run scalar and
//! the tests' model runs crawl. The ORT operator glue is `deltadoc::ops`.

pub mod attention;
pub mod conv;
pub mod gated_delta;
mod gemm;
pub mod quant_matmul;
pub mod simd;
