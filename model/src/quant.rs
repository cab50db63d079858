//! GGML tensor types and their block layouts.
//!
//! Every supported quantised type decodes *exactly* into sub-blocks of the
//! form `w[i] = scale * q[i] + offset` with small integers `q`: the products
//! `scale * q` are exact in f32 for every type (at most 21 significant bits),
//! so `fma(scale, q, offset)` rounds once, exactly like the reference
//! dequantisers (gguf-py, llama.cpp) do with `scale * q + offset`. The engine
//! repacks these sub-blocks into its own layout; [`dequantize_row`] is the
//! plain reference that tests compare everything against.
//!
//! (IMPLEMENTATION IN PROGRESS: API fixed, bodies being filled in.)

use crate::error::{ModelError, Result};

/// Tensor element types, numbered as in GGUF (`ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    /// The `ggml_type` number stored in GGUF files.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Parses a `ggml_type` number; unknown or unsupported numbers are a clear error.
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            other => return Err(ModelError::UnsupportedType(ggml_type_name(other))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block (1 for float types).
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }

    /// Bytes needed for `n` elements; errors when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        let be = self.block_elems();
        if n % be != 0 {
            return Err(ModelError::Other(format!(
                "{} elements is not a multiple of the {} block size {}",
                n,
                self.name(),
                be
            )));
        }
        Ok(n / be * self.block_bytes())
    }
}

fn ggml_type_name(id: u32) -> String {
    let known = [
        (6, "Q5_0"),
        (7, "Q5_1"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (29, "IQ1_M"),
    ];
    match known.iter().find(|(k, _)| *k == id) {
        Some((_, n)) => n.to_string(),
        None => format!("#{id}"),
    }
}

/// One exactly-decoded run of weights: `w[i] = fma(scale, q[i], offset)`.
/// `len` is 16 or 32 depending on the type (Q6_K has 16-element scales).
#[derive(Debug, Clone, Copy)]
pub struct AffineSubBlock {
    pub scale: f32,
    pub offset: f32,
    pub len: usize,
    pub q: [i8; 32],
}

impl AffineSubBlock {
    #[inline]
    pub fn value(&self, i: usize) -> f32 {
        self.scale.mul_add(self.q[i] as f32, self.offset)
    }
}

/// Sub-block length of a quantised type (the granularity of its scales).
pub fn subblock_len(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q6K => 16,
        _ => 32,
    }
}

/// Calls `f` for each sub-block of one row of a quantised type, in order.
/// `row` must hold whole blocks. Errors on float types.
pub fn for_each_subblock(ty: GgmlType, row: &[u8], f: impl FnMut(&AffineSubBlock)) -> Result<()> {
    let _ = (ty, row, f);
    Err(ModelError::Other("for_each_subblock: not yet implemented".into()))
}

/// Reference dequantisation of `out.len()` elements stored in `bytes`.
/// Bit-identical to gguf-py's `gguf.quants.dequantize`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let _ = (ty, bytes, out);
    Err(ModelError::Other("dequantize_row: not yet implemented".into()))
}
