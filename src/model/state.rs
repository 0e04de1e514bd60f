//! The values a decoder carries between calls: element types and typed buffers, shared by the
//! graph (cache element type), the decoder and snapshots.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Values of a carried tensor, row-major, in the element type the graph carries it in.
#[derive(Clone, Debug, PartialEq)]
pub enum StateData {
    /// DeltaNet state, and KV caches of f32-cache models.
    F32(Vec<f32>),
    /// KV caches of f16-cache models.
    F16(Vec<f16>),
    /// KV caches of bf16-cache models.
    Bf16(Vec<bf16>),
}

impl StateData {
    /// `n` zeros of element type `elem`.
    pub fn zeros(elem: Elem, n: usize) -> Self {
        match elem {
            Elem::F32 => Self::F32(vec![0.0; n]),
            Elem::F16 => Self::F16(vec![f16::ZERO; n]),
            Elem::Bf16 => Self::Bf16(vec![bf16::ZERO; n]),
        }
    }

    /// The values as little-endian bytes (the in-memory layout on every supported target).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice(v),
            Self::F16(v) => bytemuck::cast_slice(v),
            Self::Bf16(v) => bytemuck::cast_slice(v),
        }
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Self::F32(v) => v.clone(),
            Self::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Self::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src`'s values `from` over this buffer's from value `at` on; `None` where the
    /// element types differ or either range falls outside its buffer.
    pub fn copy_from(&mut self, at: usize, src: &StateData, from: std::ops::Range<usize>) -> Option<()> {
        fn copy<T: Copy>(dst: &mut [T], at: usize, src: &[T], from: std::ops::Range<usize>) -> Option<()> {
            let src = src.get(from)?;
            dst.get_mut(at..at + src.len())?.copy_from_slice(src);
            Some(())
        }
        match (self, src) {
            (Self::F32(d), Self::F32(s)) => copy(d, at, s, from),
            (Self::F16(d), Self::F16(s)) => copy(d, at, s, from),
            (Self::Bf16(d), Self::Bf16(s)) => copy(d, at, s, from),
            _ => None,
        }
    }

    /// Element type of the values.
    pub fn elem(&self) -> Elem {
        match self {
            Self::F32(_) => Elem::F32,
            Self::F16(_) => Elem::F16,
            Self::Bf16(_) => Elem::Bf16,
        }
    }
}

/// Element type of a carried tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Elem {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16: f32's exponent, 8 significant bits.
    Bf16,
}

impl Elem {
    /// Bytes per element.
    pub fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}
