//! GGUF v2/v3 reader (memory-mapped) and writer.
//!
//! (IMPLEMENTATION IN PROGRESS: API fixed, bodies being filled in.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::quant::GgmlType;

/// A metadata value, typed as in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type (non-negative) as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) if v >= 0 => Some(v as u64),
            MetaValue::I16(v) if v >= 0 => Some(v as u64),
            MetaValue::I32(v) if v >= 0 => Some(v as u64),
            MetaValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// Any integer or float type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v as f64),
            MetaValue::I16(v) => Some(v as f64),
            MetaValue::I32(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (innermost) one.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the tensor data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Shape in row-major order (outermost first), as safetensors and numpy write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file. Tensor bytes are borrowed from the memory map.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensorInfo>,
    #[allow(dead_code)]
    data_offset: usize,
    #[allow(dead_code)]
    mmap: Option<memmap2::Mmap>,
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor table and that
    /// every tensor lies inside the file (a truncated file is an error here,
    /// not a crash later).
    pub fn open(path: &Path) -> Result<Self> {
        Err(ModelError::InvalidGguf {
            path: path.to_path_buf(),
            reason: "reader not yet implemented".into(),
        })
    }
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// The raw bytes of a tensor (validated at open).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let _ = info;
        &[]
    }
}

/// A tensor to be written by [`write_gguf`].
pub struct GgufTensorOut {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order, `dims[0]` contiguous.
    pub dims: Vec<u64>,
    pub bytes: Vec<u8>,
}

/// Writes a GGUF v3 file (alignment 32) with the given metadata (written in
/// the given order) and tensors.
pub fn write_gguf(path: &Path, metadata: &[(String, MetaValue)], tensors: &[GgufTensorOut]) -> Result<()> {
    let _ = (metadata, tensors);
    Err(ModelError::Other(format!("{}: writer not yet implemented", path.display())))
}
