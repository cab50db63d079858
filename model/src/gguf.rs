//! GGUF v2/v3 reader (memory-mapped) and writer.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count,
//! `u64` metadata count, the metadata key/value pairs, the tensor infos
//! (name, `u32` n_dims, `u64` dims, `u32` ggml type, `u64` offset), padding
//! to `general.alignment` (default 32), then the tensor data section.
//!
//! The reader trusts nothing in the file: every length and count is checked
//! against the bytes that remain before anything is allocated, so a corrupt
//! or truncated file gives an error naming the problem instead of a huge
//! allocation, a panic or a fault when a tensor is touched later. GGUF v1
//! (32-bit counts, pre-2023) is refused; re-converting the model fixes it.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
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

/// File magic: the bytes `GGUF`.
const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of each tensor when the file does not say.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml supports at most 4 dimensions; more means a corrupt tensor table.
const MAX_DIMS: u32 = 4;
/// Deepest array-of-array nesting accepted: real files nest at most once or
/// twice, and a bound keeps a malicious file from exhausting the stack.
const MAX_ARRAY_DEPTH: u32 = 16;
/// Sizes claimed beyond this (1 TiB) are corrupt lengths, not truncation: no
/// model file is that large.
const ABSURD_SIZE: u128 = 1 << 40;

// GGUF metadata value type numbers (`gguf_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Smallest encoded size of one value of a metadata type (exact for scalars),
/// used to bound counts before allocating.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,
        T_ARRAY => 12,
        _ => return None,
    })
}

/// Bounds-checked little-endian cursor over the mapped file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn invalid(&self, reason: String) -> ModelError {
        ModelError::InvalidGguf {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Error for a claimed size of `need` bytes (of `what`) that is not there.
    /// A claim beyond [`ABSURD_SIZE`] cannot come from truncating a real file
    /// and is reported as corrupt; anything else as truncation (the message
    /// says a corrupt length is the other possibility).
    fn short(&self, need: u128, what: &dyn Fn() -> String) -> ModelError {
        if need > ABSURD_SIZE {
            self.invalid(format!(
                "corrupt length: {} at offset {} claims {} bytes (the file is {} bytes)",
                what(),
                self.pos,
                need,
                self.buf.len()
            ))
        } else {
            ModelError::Truncated {
                path: self.path.to_path_buf(),
                reason: format!(
                    "{} at offset {} needs {} bytes but the file ends after {} more (file is {} bytes; \
                     truncated download, or a corrupt length)",
                    what(),
                    self.pos,
                    need,
                    self.remaining(),
                    self.buf.len()
                ),
            }
        }
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.short(n as u128, what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `each` bytes can still fit, so a
    /// corrupt count fails here instead of in an allocation.
    fn check_count(&self, count: u64, each: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let need = count as u128 * each as u128;
        if need > self.remaining() as u128 {
            return Err(self.short(need, &|| format!("{} ({} entries)", what(), count)));
        }
        Ok(count as usize)
    }

    /// Raw bytes of a length-prefixed GGUF string.
    fn string_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len as u128 > self.remaining() as u128 {
            return Err(self.short(len as u128, &|| format!("string {}", what())));
        }
        self.take(len as usize, what)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let start = self.pos;
        let b = self.string_bytes(what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.invalid(format!(
                "{} at offset {} is not valid UTF-8: {}",
                what(),
                start,
                e
            ))),
        }
    }

    /// A metadata string value. Invalid UTF-8 (seen in some old vocabularies)
    /// is replaced rather than refusing the whole model, with a warning.
    fn value_string(&mut self, key: &str) -> Result<String> {
        let b = self.string_bytes(&|| format!("value of '{key}'"))?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => {
                tracing::warn!(path = %self.path.display(), key, "GGUF string is not valid UTF-8; replacing invalid bytes");
                Ok(String::from_utf8_lossy(b).into_owned())
            }
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        let w = || format!("value of '{key}'");
        Ok(match ty {
            T_U8 => MetaValue::U8(self.array::<1>(&w)?[0]),
            T_I8 => MetaValue::I8(self.array::<1>(&w)?[0] as i8),
            T_U16 => MetaValue::U16(u16::from_le_bytes(self.array(&w)?)),
            T_I16 => MetaValue::I16(i16::from_le_bytes(self.array(&w)?)),
            T_U32 => MetaValue::U32(u32::from_le_bytes(self.array(&w)?)),
            T_I32 => MetaValue::I32(i32::from_le_bytes(self.array(&w)?)),
            T_F32 => MetaValue::F32(f32::from_le_bytes(self.array(&w)?)),
            T_BOOL => MetaValue::Bool(self.array::<1>(&w)?[0] != 0),
            T_STRING => MetaValue::String(self.value_string(key)?),
            T_U64 => MetaValue::U64(u64::from_le_bytes(self.array(&w)?)),
            T_I64 => MetaValue::I64(i64::from_le_bytes(self.array(&w)?)),
            T_F64 => MetaValue::F64(f64::from_le_bytes(self.array(&w)?)),
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!(
                        "metadata '{key}' nests arrays deeper than {MAX_ARRAY_DEPTH} levels"
                    )));
                }
                let ety = self.u32(&|| format!("array element type of '{key}'"))?;
                let each = min_value_size(ety).ok_or_else(|| {
                    self.invalid(format!(
                        "metadata '{key}' is an array of unknown value type {ety}"
                    ))
                })?;
                let count = self.u64(&|| format!("array length of '{key}'"))?;
                let n = self.check_count(count, each, &|| format!("array '{key}'"))?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            other => {
                return Err(self.invalid(format!("metadata '{key}' has unknown value type {other}")))
            }
        })
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// An open GGUF file. Tensor bytes are borrowed from the memory map.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensorInfo>,
    data_offset: usize,
    alignment: u64,
    mmap: Option<memmap2::Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor table and that
    /// every tensor lies inside the file (a truncated file is an error here,
    /// not a crash later).
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            cause: source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // Header: magic, version, tensor count, metadata count.
        if len < 24 {
            if len >= 4 {
                let mut head = [0u8; 4];
                use std::io::Read;
                (&file).read_exact(&mut head).map_err(io)?;
                if &head != MAGIC {
                    return Err(bad_magic(path, &head));
                }
            }
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                reason: format!("file is {len} bytes, shorter than the 24-byte GGUF header"),
            });
        }
        // SAFETY: the map is read-only and private to this struct; like every
        // mmap-based model loader we assume the file is not modified while
        // open (a concurrent truncation would fault, as in llama.cpp).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let (version, metadata, tensors, data_offset, alignment) = parse(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_offset,
            alignment,
            mmap: Some(mmap),
        })
    }
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// The raw bytes of a tensor (validated at open). An info that does not
    /// belong to this file and reaches past its end gives an empty slice.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let Some(map) = self.mmap.as_deref() else {
            return &[];
        };
        let range = (|| {
            let n = usize::try_from(info.n_elements()).ok()?;
            let nbytes = info.ty.bytes_for(n).ok()?;
            let start = self
                .data_offset
                .checked_add(usize::try_from(info.offset).ok()?)?;
            Some(start..start.checked_add(nbytes)?)
        })();
        range.and_then(|r| map.get(r)).unwrap_or(&[])
    }
    /// Byte offset of the tensor data section in the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }
    /// `general.alignment` (or the default 32): tensor offsets are multiples of it.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
}

fn bad_magic(path: &Path, head: &[u8]) -> ModelError {
    ModelError::InvalidGguf {
        path: path.to_path_buf(),
        reason: format!(
            "bad magic {:?} (bytes {:02x?}), expected \"GGUF\"",
            String::from_utf8_lossy(head),
            head
        ),
    }
}

type Parsed = (
    u32,
    BTreeMap<String, MetaValue>,
    Vec<GgufTensorInfo>,
    usize,
    u64,
);

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.take(4, &|| "magic".into())?;
    if magic != MAGIC {
        return Err(bad_magic(path, magic));
    }
    let version = r.u32(&|| "version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(r.invalid(
                "GGUF version 1 is not supported (it predates 64-bit counts); re-convert the model with a current llama.cpp".into(),
            ))
        }
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(r.invalid(format!(
                "big-endian GGUF (version {}) is not supported",
                v.swap_bytes()
            )))
        }
        v => return Err(r.invalid(format!("unsupported GGUF version {v} (supported: 2, 3)"))),
    }
    let n_tensors = r.u64(&|| "tensor count".into())?;
    let n_kv = r.u64(&|| "metadata count".into())?;
    // Smallest metadata entry: empty key (8) + type (4) + 1-byte value.
    let n_kv = r.check_count(n_kv, 13, &|| "metadata table".into())?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.strict_string(&|| format!("key of metadata entry {i}"))?;
        let ty = r.u32(&|| format!("value type of '{key}'"))?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.invalid(format!("duplicate metadata key '{key}'")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
            _ => return Err(r.invalid(format!("general.alignment is {v:?}, not a power of two"))),
        },
    };

    // Smallest tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
    let n_tensors = r.check_count(n_tensors, 24, &|| "tensor table".into())?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.strict_string(&|| format!("name of tensor {i}"))?;
        let n_dims = r.u32(&|| format!("n_dims of tensor '{name}'"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.invalid(format!(
                "tensor '{name}' has {n_dims} dimensions (must be 1..={MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&|| format!("dimension {d} of tensor '{name}'"))?);
        }
        let ty_id = r.u32(&|| format!("type of tensor '{name}'"))?;
        let ty = GgmlType::from_id(ty_id).map_err(|e| match e {
            ModelError::UnsupportedType(t) => {
                ModelError::UnsupportedType(format!("{t} of tensor '{name}'"))
            }
            other => other,
        })?;
        let offset = r.u64(&|| format!("data offset of tensor '{name}'"))?;
        if !names.insert(name.clone()) {
            return Err(r.invalid(format!("duplicate tensor name '{name}'")));
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ty,
            offset,
        });
    }

    let data_offset = align_up(r.pos as u64, alignment).unwrap_or(u64::MAX);
    let file_len = buf.len() as u64;
    if !tensors.is_empty() && data_offset > file_len {
        return Err(ModelError::Truncated {
            path: path.to_path_buf(),
            reason: format!("tensor data section would start at byte {data_offset}, past the end of the {file_len}-byte file"),
        });
    }
    for t in &tensors {
        let name = &t.name;
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                r.invalid(format!("tensor '{name}' dimensions {:?} overflow", t.dims))
            })?;
        if t.dims[0] % t.ty.block_elems() as u64 != 0 {
            return Err(r.invalid(format!(
                "tensor '{name}' rows of {} elements are not whole {} blocks of {}",
                t.dims[0],
                t.ty.name(),
                t.ty.block_elems()
            )));
        }
        let nbytes = t.ty.bytes_for(n)? as u64;
        if t.offset % alignment != 0 {
            return Err(r.invalid(format!(
                "tensor '{name}' data offset {} is not a multiple of the alignment {alignment}",
                t.offset
            )));
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(nbytes));
        if end.is_none_or(|e| e as u128 > ABSURD_SIZE) {
            return Err(r.invalid(format!(
                "corrupt tensor entry: '{name}' claims {nbytes} bytes at data offset {}",
                t.offset
            )));
        }
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(ModelError::Truncated {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor '{name}' ({} bytes at data offset {}) extends past the end of the {file_len}-byte file",
                        nbytes, t.offset
                    ),
                })
            }
        }
    }
    let data_offset = data_offset.min(file_len) as usize;
    Ok((version, metadata, tensors, data_offset, alignment))
}

/// A tensor to be written by [`write_gguf`].
pub struct GgufTensorOut {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order, `dims[0]` contiguous.
    pub dims: Vec<u64>,
    pub bytes: Vec<u8>,
}

fn type_id_of(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => T_U8,
        MetaValue::I8(_) => T_I8,
        MetaValue::U16(_) => T_U16,
        MetaValue::I16(_) => T_I16,
        MetaValue::U32(_) => T_U32,
        MetaValue::I32(_) => T_I32,
        MetaValue::U64(_) => T_U64,
        MetaValue::I64(_) => T_I64,
        MetaValue::F32(_) => T_F32,
        MetaValue::F64(_) => T_F64,
        MetaValue::Bool(_) => T_BOOL,
        MetaValue::String(_) => T_STRING,
        MetaValue::Array(_) => T_ARRAY,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes a value without its type tag. GGUF arrays are homogeneous, so a
/// mixed array is an error; an empty array is written as an array of strings.
fn put_value(out: &mut Vec<u8>, key: &str, v: &MetaValue) -> Result<()> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(a) => {
            let ety = a.first().map(type_id_of).unwrap_or(T_STRING);
            if let Some(bad) = a.iter().find(|e| type_id_of(e) != ety) {
                return Err(ModelError::Other(format!(
                    "metadata '{key}': GGUF arrays must be homogeneous, found {bad:?} in an array of type {ety}"
                )));
            }
            out.extend_from_slice(&ety.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for e in a {
                put_value(out, key, e)?;
            }
        }
    }
    Ok(())
}

/// Writes a GGUF v3 file (alignment 32, or `general.alignment` when the
/// metadata sets it) with the given metadata (written in the given order)
/// and tensors. Each tensor's data starts on an alignment boundary; nothing
/// follows the last tensor, so any truncation of the file is detectable.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[GgufTensorOut],
) -> Result<()> {
    let err = |m: String| ModelError::Other(format!("writing {}: {m}", path.display()));
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = HashSet::new();
    for (k, v) in metadata {
        if !keys.insert(k.as_str()) {
            return Err(err(format!("duplicate metadata key '{k}'")));
        }
        if k == "general.alignment" {
            alignment = match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
                _ => {
                    return Err(err(format!(
                        "general.alignment {v:?} is not a power of two"
                    )))
                }
            };
        }
    }

    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut head, k);
        head.extend_from_slice(&type_id_of(v).to_le_bytes());
        put_value(&mut head, k, v)?;
    }

    let mut names = HashSet::new();
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(err(format!("duplicate tensor name '{}'", t.name)));
        }
        if t.dims.is_empty() || t.dims.len() > MAX_DIMS as usize {
            return Err(err(format!(
                "tensor '{}' has {} dimensions (must be 1..=4)",
                t.name,
                t.dims.len()
            )));
        }
        if t.dims[0] % t.ty.block_elems() as u64 != 0 {
            return Err(err(format!(
                "tensor '{}' rows of {} elements are not whole {} blocks",
                t.name,
                t.dims[0],
                t.ty.name()
            )));
        }
        let n: u64 = t.dims.iter().product();
        let need = t.ty.bytes_for(n as usize)?;
        if need != t.bytes.len() {
            return Err(err(format!(
                "tensor '{}' {:?} of {} needs {} bytes, got {}",
                t.name,
                t.dims,
                t.ty.name(),
                need,
                t.bytes.len()
            )));
        }
        offset = align_up(offset, alignment).expect("tensor offsets fit in u64");
        offsets.push(offset);
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += t.bytes.len() as u64;
    }
    let data_start = align_up(head.len() as u64, alignment).expect("header fits in u64");
    head.resize(data_start as usize, 0);

    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&head).map_err(io)?;
    let mut pos = 0u64;
    let zeros = vec![0u8; alignment as usize];
    for (t, &off) in tensors.iter().zip(&offsets) {
        w.write_all(&zeros[..(off - pos) as usize]).map_err(io)?;
        w.write_all(&t.bytes).map_err(io)?;
        pos = off + t.bytes.len() as u64;
    }
    w.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_types_metadata() -> Vec<(String, MetaValue)> {
        use MetaValue::*;
        vec![
            ("general.architecture".into(), String("llama".into())),
            ("t.u8".into(), U8(200)),
            ("t.i8".into(), I8(-100)),
            ("t.u16".into(), U16(60000)),
            ("t.i16".into(), I16(-30000)),
            ("t.u32".into(), U32(4_000_000_000)),
            ("t.i32".into(), I32(-2_000_000_000)),
            ("t.u64".into(), U64(u64::MAX - 1)),
            ("t.i64".into(), I64(i64::MIN + 1)),
            ("t.f32".into(), F32(-1.5e-7)),
            ("t.f64".into(), F64(std::f64::consts::PI)),
            ("t.bool_t".into(), Bool(true)),
            ("t.bool_f".into(), Bool(false)),
            ("t.str_utf8".into(), String("héllo ▁wörld 🦀".into())),
            ("t.str_empty".into(), String("".into())),
            (
                "t.arr_str".into(),
                Array(vec![
                    String("a".into()),
                    String("".into()),
                    String("ĠĠ".into()),
                ]),
            ),
            ("t.arr_i32".into(), Array(vec![I32(1), I32(-2), I32(3)])),
            ("t.arr_f32".into(), Array(vec![F32(0.25), F32(-0.0)])),
            ("t.arr_u8".into(), Array(vec![U8(1), U8(255)])),
            ("t.arr_bool".into(), Array(vec![Bool(true), Bool(false)])),
            ("t.arr_empty".into(), Array(vec![])),
            (
                "t.arr_nested".into(),
                Array(vec![
                    Array(vec![U64(1), U64(2)]),
                    Array(vec![]),
                    Array(vec![U64(3)]),
                ]),
            ),
        ]
    }

    fn test_tensors() -> Vec<GgufTensorOut> {
        let pat = |n: usize, seed: u8| {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect::<Vec<u8>>()
        };
        vec![
            GgufTensorOut {
                name: "norm".into(),
                ty: GgmlType::F32,
                dims: vec![7],
                bytes: pat(28, 1),
            },
            GgufTensorOut {
                name: "a.q4_1".into(),
                ty: GgmlType::Q4_1,
                dims: vec![64, 3],
                bytes: pat(2 * 3 * 20, 2),
            },
            GgufTensorOut {
                name: "b.q6k".into(),
                ty: GgmlType::Q6K,
                dims: vec![256, 2],
                bytes: pat(2 * 210, 3),
            },
            GgufTensorOut {
                name: "c.f16".into(),
                ty: GgmlType::F16,
                dims: vec![3, 1, 2],
                bytes: pat(12, 4),
            },
            GgufTensorOut {
                name: "d.q8".into(),
                ty: GgmlType::Q8_0,
                dims: vec![32],
                bytes: pat(34, 5),
            },
        ]
    }

    fn write_test_file(dir: &Path) -> PathBuf {
        let p = dir.join("t.gguf");
        write_gguf(&p, &all_types_metadata(), &test_tensors()).unwrap();
        p
    }

    #[test]
    fn round_trip_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_test_file(dir.path());
        // Lets a person check the writer against other readers (gguf-py).
        if let Some(keep) = std::env::var_os("TANDEM_KEEP_TEST_GGUF") {
            std::fs::copy(&p, keep).unwrap();
        }
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_offset() % 32, 0);
        let meta = all_types_metadata();
        assert_eq!(f.metadata.len(), meta.len());
        for (k, v) in &meta {
            let got = f.get(k).unwrap_or_else(|| panic!("missing {k}"));
            // Compare bitwise where floats are involved (-0.0 == 0.0 otherwise).
            assert_eq!(format!("{got:?}"), format!("{v:?}"), "{k}");
            assert_eq!(got, v, "{k}");
        }
        let ts = test_tensors();
        assert_eq!(f.tensors.len(), ts.len());
        for (t, info) in ts.iter().zip(&f.tensors) {
            assert_eq!(info.name, t.name);
            assert_eq!(info.dims, t.dims);
            assert_eq!(info.ty, t.ty);
            assert_eq!(info.offset % 32, 0);
            assert_eq!(f.tensor_bytes(info), &t.bytes[..], "{}", t.name);
        }
        assert_eq!(f.tensor_info("c.f16").unwrap().shape(), vec![2, 1, 3]);
        // Metadata keys are written in the given order.
        let raw = std::fs::read(&p).unwrap();
        let pos = |s: &str| {
            raw.windows(s.len())
                .position(|w| w == s.as_bytes())
                .unwrap()
        };
        assert!(pos("general.architecture") < pos("t.u8") && pos("t.u8") < pos("t.arr_nested"));
        // Nothing after the last tensor.
        let last = f.tensors.last().unwrap();
        assert_eq!(raw.len() as u64, f.data_offset() as u64 + last.offset + 34);
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        let meta = vec![("general.alignment".to_string(), MetaValue::U32(64))];
        write_gguf(&p, &meta, &test_tensors()).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        for (t, info) in test_tensors().iter().zip(&f.tensors) {
            assert_eq!(info.offset % 64, 0);
            assert_eq!(f.tensor_bytes(info), &t.bytes[..]);
        }
    }

    #[test]
    fn writer_rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.gguf");
        let mut t = test_tensors();
        t[1].bytes.pop();
        assert!(write_gguf(&p, &[], &t).is_err());
        let mixed = vec![(
            "m".to_string(),
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
        )];
        assert!(write_gguf(&p, &mixed, &[]).is_err());
        let dup = vec![
            ("k".to_string(), MetaValue::U8(1)),
            ("k".to_string(), MetaValue::U8(2)),
        ];
        assert!(write_gguf(&p, &dup, &[]).is_err());
        let mut t = test_tensors();
        t[0].name = t[2].name.clone();
        assert!(write_gguf(&p, &[], &t).is_err());
    }

    #[test]
    fn truncated_copies_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_test_file(dir.path());
        let raw = std::fs::read(&p).unwrap();
        let data_offset = GgufFile::open(&p).unwrap().data_offset();
        let mut cuts: Vec<usize> = vec![
            0,
            1,
            3,
            4,
            7,
            8,
            20,
            23,
            24,
            25,
            40,
            data_offset - 1,
            data_offset,
            data_offset + 1,
        ];
        cuts.extend((0..raw.len()).step_by(7));
        cuts.push(raw.len() - 1);
        let q = dir.path().join("cut.gguf");
        for cut in cuts {
            std::fs::write(&q, &raw[..cut]).unwrap();
            match GgufFile::open(&q) {
                Ok(_) => panic!("cut at {cut} of {} opened", raw.len()),
                Err(ModelError::Truncated { reason, .. }) => assert!(!reason.is_empty()),
                Err(e) => panic!("cut at {cut}: unexpected error {e}"),
            }
        }
        // Cutting into the last tensor is reported as that tensor.
        std::fs::write(&q, &raw[..raw.len() - 1]).unwrap();
        let e = GgufFile::open(&q).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("d.q8"), "{e}");
    }

    #[test]
    fn bad_magic_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_test_file(dir.path());
        let raw = std::fs::read(&p).unwrap();
        let q = dir.path().join("x.gguf");
        let mut bad = raw.clone();
        bad[..4].copy_from_slice(b"GGML");
        std::fs::write(&q, &bad).unwrap();
        let e = GgufFile::open(&q).unwrap_err();
        assert!(
            matches!(e, ModelError::InvalidGguf { .. }) && e.to_string().contains("magic"),
            "{e}"
        );
        // Too short to be anything, with a wrong magic: still a magic error.
        std::fs::write(&q, b"PK\x03\x04abc").unwrap();
        assert!(GgufFile::open(&q)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        for (v, needle) in [
            (1u32, "version 1"),
            (4, "unsupported GGUF version 4"),
            (3u32.swap_bytes(), "big-endian"),
        ] {
            let mut b = raw.clone();
            b[4..8].copy_from_slice(&v.to_le_bytes());
            std::fs::write(&q, &b).unwrap();
            let e = GgufFile::open(&q).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        // Version 2 has the same layout and is accepted.
        let mut b = raw.clone();
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&q, &b).unwrap();
        assert_eq!(GgufFile::open(&q).unwrap().version, 2);
        assert!(matches!(
            GgufFile::open(&dir.path().join("missing.gguf")),
            Err(ModelError::Io { .. })
        ));
    }

    /// Header with `n_tensors`/`n_kv` followed by `rest`.
    fn raw_file(n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn absurd_lengths_and_counts_are_errors_not_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("x.gguf");
        let open = |bytes: Vec<u8>| {
            std::fs::write(&q, bytes).unwrap();
            GgufFile::open(&q).unwrap_err().to_string()
        };
        // Key string length 2^62.
        let mut rest = (1u64 << 62).to_le_bytes().to_vec();
        rest.extend_from_slice(&[b'k'; 16]);
        let e = open(raw_file(0, 1, &rest));
        assert!(e.contains("corrupt length"), "{e}");
        // A string value claiming u64::MAX bytes.
        let mut rest = Vec::new();
        put_string(&mut rest, "key");
        rest.extend_from_slice(&T_STRING.to_le_bytes());
        rest.extend_from_slice(&u64::MAX.to_le_bytes());
        rest.extend_from_slice(b"abc");
        let e = open(raw_file(0, 1, &rest));
        assert!(e.contains("corrupt length") && e.contains("'key'"), "{e}");
        // A plausible length past the end is truncation.
        let mut rest = Vec::new();
        put_string(&mut rest, "key");
        rest.extend_from_slice(&T_STRING.to_le_bytes());
        rest.extend_from_slice(&1000u64.to_le_bytes());
        rest.extend_from_slice(b"abc");
        std::fs::write(&q, raw_file(0, 1, &rest)).unwrap();
        assert!(matches!(
            GgufFile::open(&q),
            Err(ModelError::Truncated { .. })
        ));
        // An array of 2^40 u32 and a metadata count of 2^50.
        let mut rest = Vec::new();
        put_string(&mut rest, "arr");
        rest.extend_from_slice(&T_ARRAY.to_le_bytes());
        rest.extend_from_slice(&T_U32.to_le_bytes());
        rest.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let e = open(raw_file(0, 1, &rest));
        assert!(e.contains("'arr'"), "{e}");
        let e = open(raw_file(0, 1 << 50, &[0; 64]));
        assert!(e.contains("metadata table"), "{e}");
        let e = open(raw_file(u64::MAX, 0, &[0; 64]));
        assert!(e.contains("tensor table"), "{e}");
        // Unknown value type, deep nesting.
        let mut rest = Vec::new();
        put_string(&mut rest, "weird");
        rest.extend_from_slice(&99u32.to_le_bytes());
        rest.extend_from_slice(&[0; 16]);
        assert!(open(raw_file(0, 1, &rest)).contains("unknown value type 99"));
        let mut rest = Vec::new();
        put_string(&mut rest, "deep");
        rest.extend_from_slice(&T_ARRAY.to_le_bytes());
        for _ in 0..1000 {
            rest.extend_from_slice(&T_ARRAY.to_le_bytes());
            rest.extend_from_slice(&1u64.to_le_bytes());
        }
        rest.extend_from_slice(&[0; 64]);
        assert!(open(raw_file(0, 1, &rest)).contains("deeper"));
    }

    #[test]
    fn bad_tensor_entries_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("x.gguf");
        let tensor = |name: &str, dims: &[u64], ty: u32, offset: u64| {
            let mut rest = Vec::new();
            put_string(&mut rest, name);
            rest.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                rest.extend_from_slice(&d.to_le_bytes());
            }
            rest.extend_from_slice(&ty.to_le_bytes());
            rest.extend_from_slice(&offset.to_le_bytes());
            rest.resize(rest.len() + 4096, 0);
            let b = raw_file(1, 0, &rest);
            std::fs::write(&q, b).unwrap();
            GgufFile::open(&q)
        };
        // Well-formed: 32 f32 at offset 0 fits in the zero padding.
        let f = tensor("ok", &[32], 0, 0).unwrap();
        assert_eq!(f.tensor_bytes(&f.tensors[0]).len(), 128);
        let e = tensor("blk.0.q5", &[32], 6, 0).unwrap_err();
        assert!(
            matches!(&e, ModelError::UnsupportedType(s) if s.contains("Q5_0") && s.contains("blk.0.q5")),
            "{e}"
        );
        let e = tensor("big", &[1 << 12, 1 << 12], 0, 0).unwrap_err();
        assert!(
            matches!(e, ModelError::Truncated { .. }) && e.to_string().contains("'big'"),
            "{e}"
        );
        let e = tensor("huge", &[1 << 30, 1 << 30], 0, 0).unwrap_err();
        assert!(
            matches!(e, ModelError::InvalidGguf { .. }) && e.to_string().contains("'huge'"),
            "{e}"
        );
        let e = tensor("ovf", &[u64::MAX, 2], 0, 0).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");
        let e = tensor("far", &[32], 0, u64::MAX - 31)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'far'"), "{e}");
        let e = tensor("odd", &[32], 0, 4).unwrap_err().to_string();
        assert!(e.contains("alignment"), "{e}");
        let e = tensor("rows", &[48], 2, 0).unwrap_err().to_string();
        assert!(e.contains("blocks"), "{e}");
        let e = tensor("dims5", &[1, 1, 1, 1, 1], 0, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dimensions"), "{e}");
    }

    #[test]
    fn opens_the_default_model() {
        let path = crate::default_model_path();
        assert!(
            path.exists(),
            "{} not installed: run `tandem model fetch`",
            path.display()
        );
        let t0 = std::time::Instant::now();
        let f = GgufFile::open(&path).unwrap();
        let dt = t0.elapsed();
        eprintln!("opened {} in {:?}", path.display(), dt);
        assert_eq!(f.version, 3);
        assert_eq!(
            f.get("general.architecture").and_then(|v| v.as_str()),
            Some("llama")
        );
        assert_eq!(f.tensors.len(), 272);
        assert_eq!(f.metadata.len(), 33);
        assert_eq!(f.data_offset(), 1_785_664); // as gguf-py's GGUFReader reports
        let emb = f.tensor_info("token_embd.weight").unwrap();
        assert_eq!(emb.dims, vec![576, 49152]);
        assert_eq!(emb.ty, GgmlType::Q8_0);
        assert_eq!(f.tensor_bytes(emb).len(), 576 * 49152 / 32 * 34);
        let q = f.tensor_info("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.ty, q.dims.clone()), (GgmlType::Q4_1, vec![576, 576]));
        let n = f.tensor_info("output_norm.weight").unwrap();
        assert_eq!((n.ty, n.dims.clone()), (GgmlType::F32, vec![576]));
        for t in &f.tensors {
            assert!(
                matches!(t.ty, GgmlType::F32 | GgmlType::Q4_1 | GgmlType::Q8_0),
                "{} {:?}",
                t.name,
                t.ty
            );
            assert_eq!(
                f.tensor_bytes(t).len(),
                t.ty.bytes_for(t.n_elements() as usize).unwrap()
            );
        }
        let tokens = f
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .unwrap();
        assert_eq!(tokens.len(), 49152);
        assert!(tokens.iter().all(|t| t.as_str().is_some()));
        // Dequantise a row of the embedding to make sure the bytes are real.
        let mut row = vec![0f32; 576];
        crate::quant::dequantize_row(
            GgmlType::Q8_0,
            &f.tensor_bytes(emb)[..576 / 32 * 34],
            &mut row,
        )
        .unwrap();
        assert!(row.iter().all(|v| v.is_finite()) && row.iter().any(|&v| v != 0.0));
        assert!(dt < std::time::Duration::from_secs(2), "open took {dt:?}");
        // Prefixes of the real file (cut inside the vocabulary, the merges,
        // the tensor table, the data) are all reported as truncated.
        let raw = std::fs::read(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("cut.gguf");
        for cut in [
            100,
            1_000,
            100_000,
            1_000_000,
            1_700_000,
            1_785_664,
            40_000_000,
            raw.len() - 1,
        ] {
            std::fs::write(&q, &raw[..cut]).unwrap();
            let e = GgufFile::open(&q).unwrap_err();
            assert!(matches!(e, ModelError::Truncated { .. }), "cut {cut}: {e}");
        }
    }
}
