//! Writing ONNX graphs: protobuf messages ([`proto`]) and a builder that streams large weights to
//! an external-data file as it goes, so a 9B model never sits in memory twice.

pub mod proto;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

use self::proto::*;

/// Tensors of at least this many bytes go to the external data file; smaller ones stay inline.
const EXTERNAL_MIN_BYTES: usize = 1024;
/// Alignment of external tensors: page-aligned so ONNX Runtime can map them directly.
const EXTERNAL_ALIGN: u64 = 4096;

/// A symbolic or fixed dimension of a graph input or output.
#[derive(Clone, Debug)]
pub enum Dim {
    /// A known size.
    Fixed(i64),
    /// A symbolic size shared by name across inputs and outputs.
    Named(&'static str),
}

/// An attribute value.
pub enum Attr {
    /// `INT` attribute.
    Int(i64),
    /// `FLOAT` attribute.
    Float(f32),
    /// `STRING` attribute.
    Str(String),
    /// `INTS` attribute.
    Ints(Vec<i64>),
}

/// Builds one graph; weights are appended to `<model>.data` while nodes are added.
pub struct GraphBuilder {
    graph: GraphProto,
    data: BufWriter<File>,
    data_name: String,
    data_path: PathBuf,
    offset: u64,
    counter: usize,
}

impl GraphBuilder {
    /// Starts a graph whose model file will be `model_path`; weights go to `model_path` + `.data`.
    pub fn new(name: &str, model_path: &Path) -> Result<Self> {
        let data_path = PathBuf::from(format!("{}.data", model_path.display()));
        let data_name = data_path.file_name().unwrap().to_string_lossy().into_owned();
        let f = File::create(&data_path).with_context(|| format!("{}: cannot create", data_path.display()))?;
        Ok(Self {
            graph: GraphProto { name: name.into(), ..Default::default() },
            data: BufWriter::with_capacity(8 << 20, f),
            data_name,
            data_path,
            offset: 0,
            counter: 0,
        })
    }

    /// A fresh value name with the given prefix.
    pub fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: i32, dims: &[Dim]) {
        self.graph.input.push(value_info(name, elem, dims));
    }

    /// Declares a graph output.
    pub fn output(&mut self, name: &str, elem: i32, dims: &[Dim]) {
        self.graph.output.push(value_info(name, elem, dims));
    }

    /// Adds an initializer from raw little-endian bytes; large ones go to the external data file.
    pub fn initializer(&mut self, name: &str, data_type: i32, dims: &[i64], bytes: &[u8]) -> Result<String> {
        let mut t = TensorProto { name: name.into(), data_type, dims: dims.to_vec(), ..Default::default() };
        if bytes.len() < EXTERNAL_MIN_BYTES {
            t.raw_data = bytes.to_vec();
        } else {
            let pad = (EXTERNAL_ALIGN - self.offset % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
            if pad > 0 {
                self.data.write_all(&vec![0u8; pad as usize])?;
                self.offset += pad;
            }
            self.data.write_all(bytes).with_context(|| format!("{}: write failed", self.data_path.display()))?;
            t.data_location = 1;
            t.external_data = vec![
                entry("location", &self.data_name),
                entry("offset", &self.offset.to_string()),
                entry("length", &bytes.len().to_string()),
            ];
            self.offset += bytes.len() as u64;
        }
        self.graph.initializer.push(t);
        Ok(name.into())
    }

    /// f32 initializer.
    pub fn f32s(&mut self, name: &str, dims: &[i64], values: &[f32]) -> Result<String> {
        self.initializer(name, data_type::FLOAT, dims, bytemuck::cast_slice(values))
    }

    /// i64 constant with a fresh name.
    pub fn i64s(&mut self, prefix: &str, dims: &[i64], values: &[i64]) -> Result<String> {
        let name = self.fresh(prefix);
        self.initializer(&name, data_type::INT64, dims, bytemuck::cast_slice(values))
    }

    /// 1-D i64 constant.
    pub fn ints(&mut self, values: &[i64]) -> Result<String> {
        self.i64s("const_i64", &[values.len() as i64], values)
    }

    /// f32 scalar constant.
    pub fn scalar(&mut self, v: f32) -> Result<String> {
        let name = self.fresh("const_f32");
        self.f32s(&name, &[], &[v])
    }

    /// Adds a node and returns its output names (fresh ones, prefixed by the op type).
    pub fn node(&mut self, op: &str, inputs: &[&str], n_out: usize, attrs: Vec<(&str, Attr)>) -> Vec<String> {
        self.node_in(op, "", inputs, n_out, attrs)
    }

    /// Single-output [`Self::node`].
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.node(op, inputs, 1, attrs).remove(0)
    }

    /// `Reshape` to a constant shape (0 keeps that axis, −1 infers it).
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> Result<String> {
        let s = self.ints(shape)?;
        Ok(self.op("Reshape", &[x, &s], vec![]))
    }

    /// `Split` into parts of the given sizes along `axis`.
    pub fn split(&mut self, x: &str, sizes: &[i64], axis: i64) -> Result<Vec<String>> {
        let s = self.ints(sizes)?;
        Ok(self.node("Split", &[x, &s], sizes.len(), vec![("axis", Attr::Int(axis))]))
    }

    /// Adds a node of the given domain.
    pub fn node_in(&mut self, op: &str, domain: &str, inputs: &[&str], n_out: usize, attrs: Vec<(&str, Attr)>) -> Vec<String> {
        let outs: Vec<String> = (0..n_out).map(|_| self.fresh(op)).collect();
        self.node_named(op, domain, inputs, &outs.iter().map(String::as_str).collect::<Vec<_>>(), attrs);
        outs
    }

    /// Adds a node with explicit output names (graph outputs).
    pub fn node_named(&mut self, op: &str, domain: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        let name = self.fresh(&format!("n_{op}"));
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.into(),
            domain: domain.into(),
            attribute: attrs.into_iter().map(|(n, a)| attribute(n, a)).collect(),
            doc_string: String::new(),
        });
    }

    /// Flushes the data file and writes `model_path`.
    pub fn finish(mut self, model_path: &Path, opsets: &[(&str, i64)], metadata: &[(&str, String)]) -> Result<()> {
        self.data.flush()?;
        let f = self.data.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        let model = ModelProto {
            // IR 11 is the version that goes with opset 23 (RMSNormalization).
            ir_version: 11,
            opset_import: opsets.iter().map(|(d, v)| OperatorSetIdProto { domain: d.to_string(), version: *v }).collect(),
            producer_name: "deltadoc".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            metadata_props: metadata.iter().map(|(k, v)| entry(k, v)).collect(),
            ..Default::default()
        };
        let mut out = File::create(model_path).with_context(|| format!("{}: cannot create", model_path.display()))?;
        out.write_all(&model.encode_to_vec())?;
        out.sync_all()?;
        Ok(())
    }
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: k.into(), value: v.into() }
}

fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: elem,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::Fixed(v) => dimension::Value::DimValue(*v),
                                Dim::Named(s) => dimension::Value::DimParam(s.to_string()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn attribute(name: &str, a: Attr) -> AttributeProto {
    let mut p = AttributeProto { name: name.into(), ..Default::default() };
    match a {
        Attr::Int(i) => {
            p.r#type = attribute_type::INT;
            p.i = i;
        }
        Attr::Float(f) => {
            p.r#type = attribute_type::FLOAT;
            p.f = f;
        }
        Attr::Str(s) => {
            p.r#type = attribute_type::STRING;
            p.s = s.into_bytes();
        }
        Attr::Ints(v) => {
            p.r#type = attribute_type::INTS;
            p.ints = v;
        }
    }
    p
}
