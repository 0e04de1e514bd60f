//! How the decoder holds each carried state between calls, and the typed buffer operations the
//! caches need (append without moving, overwrite in place).

use anyhow::{Result, anyhow, bail};
use ndarray::{ArrayD, IxDyn};
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor, TensorRef};

use crate::model::state::{Elem, StateData};

/// A state the decoder carries from call to call.
pub(super) enum Carried {
    /// A DeltaNet layer's conv or recurrent state: each call returns the next one whole.
    Whole(DynValue),
    /// An attention layer's keys or values, `[1, P, heads, head_dim]` position-major: each call
    /// returns only its own rows, appended here, so the cache is neither copied nor moved while
    /// it stays within its reservation.
    Rows { data: StateData, heads: usize, head_dim: usize },
}

impl Carried {
    /// Shape and element type, as the next call reads it.
    pub(super) fn layout(&self) -> Result<(Vec<usize>, Elem)> {
        match self {
            Self::Whole(v) => state_layout(v),
            Self::Rows { data, heads, head_dim } => {
                Ok((vec![1, data.len() / (heads * head_dim), *heads, *head_dim], data.elem()))
            }
        }
    }

    /// Shape and a copy of the values.
    pub(super) fn copy(&self) -> Result<(Vec<usize>, StateData)> {
        match self {
            Self::Whole(v) => copy_state(v),
            Self::Rows { data, .. } => Ok((self.layout()?.0, data.clone())),
        }
    }

    /// The value as the next call's input; a cache is lent, not copied.
    pub(super) fn input(&self) -> Result<SessionInputValue<'_>> {
        match self {
            Self::Whole(v) => Ok(v.into()),
            Self::Rows { data, .. } => lend(data, self.layout()?.0),
        }
    }
}

/// `data` as a graph input of `shape`, lent, not copied.
pub(super) fn lend(data: &StateData, shape: Vec<usize>) -> Result<SessionInputValue<'_>> {
    Ok(match data {
        StateData::F32(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
        StateData::F16(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
        StateData::Bf16(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
    })
}

/// Appends a call's rows (an attention output) to a cache, growing it by a quarter when full
/// rather than doubling it, so an unreserved sequence overshoots its memory by little.
pub(super) fn append(cache: &mut StateData, rows: &DynValue) -> Result<()> {
    fn push<T: Copy>(cache: &mut Vec<T>, rows: &[T]) {
        let need = cache.len() + rows.len();
        if need > cache.capacity() {
            cache.reserve_exact(need + need / 4 - cache.len());
        }
        cache.extend_from_slice(rows);
    }
    match cache {
        StateData::F32(c) => push(c, rows.try_extract_tensor::<f32>()?.1),
        StateData::F16(c) => push(c, rows.try_extract_tensor::<half::f16>()?.1),
        StateData::Bf16(c) => push(c, rows.try_extract_tensor::<half::bf16>()?.1),
    }
    Ok(())
}

/// Makes room for `additional` more elements without over-allocating.
pub(super) fn reserve_exact(cache: &mut StateData, additional: usize) {
    match cache {
        StateData::F32(c) => c.reserve_exact(additional),
        StateData::F16(c) => c.reserve_exact(additional),
        StateData::Bf16(c) => c.reserve_exact(additional),
    }
}

/// Replaces a cache's rows with `saved`'s (same element type, checked by the caller), keeping
/// its allocation when it is large enough.
pub(super) fn overwrite(cache: &mut StateData, saved: &StateData) {
    fn copy<T: Copy>(cache: &mut Vec<T>, saved: &[T]) {
        cache.clear();
        cache.extend_from_slice(saved);
    }
    match (cache, saved) {
        (StateData::F32(c), StateData::F32(s)) => copy(c, s),
        (StateData::F16(c), StateData::F16(s)) => copy(c, s),
        (StateData::Bf16(c), StateData::Bf16(s)) => copy(c, s),
        (c, s) => *c = s.clone(),
    }
}

/// Shape and a copy of the values of a carried state tensor.
pub(super) fn copy_state(v: &DynValue) -> Result<(Vec<usize>, StateData)> {
    let (shape, elem) = state_layout(v)?;
    let data = match elem {
        Elem::F32 => StateData::F32(v.try_extract_tensor::<f32>()?.1.to_vec()),
        Elem::F16 => StateData::F16(v.try_extract_tensor::<half::f16>()?.1.to_vec()),
        Elem::Bf16 => StateData::Bf16(v.try_extract_tensor::<half::bf16>()?.1.to_vec()),
    };
    Ok((shape, data))
}

/// Shape and element type of a carried state tensor, without copying it.
pub(super) fn state_layout(v: &DynValue) -> Result<(Vec<usize>, Elem)> {
    match v.dtype() {
        ort::value::ValueType::Tensor { ty, shape, .. } => {
            let elem = match ty {
                ort::value::TensorElementType::Float32 => Elem::F32,
                ort::value::TensorElementType::Float16 => Elem::F16,
                ort::value::TensorElementType::Bfloat16 => Elem::Bf16,
                other => bail!("state tensor of {other}: the graph carries f32, f16 or bf16 state"),
            };
            Ok((shape.iter().map(|&d| d as usize).collect(), elem))
        }
        other => Err(anyhow!("state value is a {other}, not a tensor")),
    }
}

/// A graph input holding `data` with `shape`.
pub(super) fn state_value(shape: &[usize], data: StateData) -> Result<DynValue> {
    Ok(match data {
        StateData::F32(v) => Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), v)?)?.into_dyn(),
        StateData::F16(v) => Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), v)?)?.into_dyn(),
        StateData::Bf16(v) => Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), v)?)?.into_dyn(),
    })
}
