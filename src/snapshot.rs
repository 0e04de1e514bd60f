//! Decoder state snapshots: the KV cache of the attention layers and the conv + recurrent state
//! of the DeltaNet layers at a token boundary, in memory and on disk.
//!
//! A hybrid model cannot rewind its recurrent state, so prefix reuse (prefill a document once,
//! continue every stage from it) and resumable prefill need the whole state saved, not a KV prefix.
//!
//! File format (little-endian): magic `DDSNAP\0\0`, u32 format version, u32 header length, the
//! header as JSON (`Header`), the tensors' data (f32 or f16, as named in the header) in header
//! order, then the SHA-256 of
//! everything before it. Files are written to a temporary name, fsynced and renamed, so a crash
//! never leaves a half-written snapshot under the real name.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::state::{Elem, StateData};

const MAGIC: &[u8; 8] = b"DDSNAP\0\0";
/// Version of the on-disk layout. 2: an element type per tensor (f16 KV caches); bf16 came later
/// as a new element name, which older readers reject by name. 3: KV caches position-major,
/// `[1, P, Hkv, D]`.
pub const FORMAT_VERSION: u32 = 3;

/// One carried tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct StateTensor {
    /// Graph input name (`past.<layer>.<key|value|conv|recurrent>`).
    pub name: String,
    /// Its shape as the graph reads it.
    pub shape: Vec<usize>,
    /// Its values.
    pub data: StateData,
}

/// The decoder's state after `tokens` tokens of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Identity of the model the state belongs to ([`crate::model::Manifest::identity`]).
    pub model: String,
    /// Tokens consumed.
    pub tokens: usize,
    /// Rotary position offset of the next token (non-zero after images).
    pub rope_delta: i64,
    /// [`ids_digest`] of the consumed tokens when known (resumable prefill checks it), else empty.
    pub prefix_sha256: String,
    /// Every state tensor, in the decoder's order.
    pub tensors: Vec<StateTensor>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    model: String,
    tokens: usize,
    // Absent in snapshots written before images were supported: text only, offset 0.
    #[serde(default)]
    rope_delta: i64,
    prefix_sha256: String,
    tensors: Vec<(String, Vec<usize>, Elem)>,
}

/// SHA-256 (hex) of token ids as little-endian u32: names a prompt prefix.
pub fn ids_digest(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    crate::util::hex(&h.finalize())
}

impl Snapshot {
    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.data.as_bytes().len()).sum()
    }

    /// Writes the snapshot to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        // A fleet's daemons may checkpoint the same prefix into a shared folder at once: each
        // fills a file of its own, and the last rename wins with a whole snapshot.
        let tmp = crate::output::temp_beside(path, crate::output::STALE_TEMP)?;
        let header = serde_json::to_vec(&Header {
            model: self.model.clone(),
            tokens: self.tokens,
            rope_delta: self.rope_delta,
            prefix_sha256: self.prefix_sha256.clone(),
            tensors: self.tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.data.elem())).collect(),
        })?;
        {
            let f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
            let mut w = HashingWriter { inner: BufWriter::with_capacity(1 << 20, f), hash: Sha256::new() };
            w.write_all(MAGIC)?;
            w.write_all(&FORMAT_VERSION.to_le_bytes())?;
            w.write_all(&(header.len() as u32).to_le_bytes())?;
            w.write_all(&header)?;
            for t in &self.tensors {
                w.write_all(t.data.as_bytes())?;
            }
            let digest = w.hash.finalize();
            let mut inner = w.inner;
            inner.write_all(&digest)?;
            let f = inner.into_inner().map_err(|e| e.into_error())?;
            f.sync_all().with_context(|| format!("{}: fsync failed", tmp.display()))?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
        Ok(())
    }

    /// Reads a snapshot, checking magic, version, sizes and checksum.
    pub fn load(path: &Path) -> Result<Self> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("{}: cannot read snapshot", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("{}: not a valid deltadoc snapshot", path.display()))
    }

    /// [`Snapshot::load`] for bytes already read. A snapshot is only ever written by deltadoc,
    /// but whoever can write the state folder can hand it anything: every size is checked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 16 + 32 || &bytes[..8] != MAGIC {
            return Err(anyhow!("wrong magic or truncated"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(anyhow!("checksum mismatch (truncated or corrupted)"));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            bail!("snapshot format {version} is not supported (expects {FORMAT_VERSION})");
        }
        let hlen = u32::from_le_bytes(body[12..16].try_into().unwrap()) as usize;
        let header: Header = serde_json::from_slice(body.get(16..16 + hlen).ok_or_else(|| anyhow!("header past the end"))?)
            .map_err(|e| anyhow!("header: {e}"))?;
        let mut data = &body[16 + hlen..];
        let mut tensors = Vec::with_capacity(header.tensors.len().min(1024));
        for (name, shape, elem) in header.tensors {
            let width = elem.width();
            let bytes = shape.iter().try_fold(width, |acc, &d| acc.checked_mul(d));
            let raw = bytes.and_then(|b| data.get(..b)).ok_or_else(|| anyhow!("tensor {name} past the end"))?;
            let values = match elem {
                Elem::F32 => StateData::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
                Elem::F16 => StateData::F16(raw.chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap())).collect()),
                Elem::Bf16 => StateData::Bf16(raw.chunks_exact(2).map(|c| bf16::from_le_bytes(c.try_into().unwrap())).collect()),
            };
            data = &data[raw.len()..];
            tensors.push(StateTensor { name, shape, data: values });
        }
        if !data.is_empty() {
            return Err(anyhow!("trailing bytes"));
        }
        Ok(Self {
            model: header.model,
            tokens: header.tokens,
            rope_delta: header.rope_delta,
            prefix_sha256: header.prefix_sha256,
            tensors,
        })
    }
}

/// Hashes everything written through it.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            model: "abc".into(),
            tokens: 5,
            rope_delta: -3,
            prefix_sha256: ids_digest(&[1, 2, 3, 4, 5]),
            tensors: vec![
                StateTensor {
                    name: "past.0.conv".into(),
                    shape: vec![1, 2, 3],
                    data: StateData::F32((0..6).map(|i| i as f32 * 0.5).collect()),
                },
                StateTensor {
                    name: "past.3.key".into(),
                    shape: vec![1, 1, 2, 2],
                    data: StateData::F16([0.5, -1.0, 3.25, 65504.0].map(f16::from_f32).to_vec()),
                },
                StateTensor {
                    name: "past.7.value".into(),
                    shape: vec![1, 1, 1, 3],
                    data: StateData::Bf16([0.5, -1.5e30, 3.25].map(bf16::from_f32).to_vec()),
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.ddsnap");
        let s = sample();
        s.save(&p).unwrap();
        assert_eq!(Snapshot::load(&p).unwrap(), s);
        // Flip one data byte: the checksum catches it.
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() - 40;
        bytes[at] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(format!("{:#}", Snapshot::load(&p).unwrap_err()).contains("checksum mismatch"));
        // Truncation too.
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(Snapshot::load(&p).is_err());
    }
}
