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
//! Types without an additive term (Q4_0, Q8_0, Q6_K) use `offset = -0.0`, not
//! `+0.0`: `fma(s, q, -0.0)` returns the product `s * q` bit for bit (a `-0.0`
//! product stays `-0.0`), while `+0.0` would turn negative zeros positive and
//! break bit-exactness against the references.
//!
//! Element order inside blocks follows ggml (`dequantize_row_*` in
//! ggml-quants.c) and gguf-py: Q4_0/Q4_1 put elements 0..15 in the low nibbles
//! and 16..31 in the high nibbles; Q4_K/Q5_K take pairs of 32-element
//! sub-blocks from the low then high nibbles of each 32-byte chunk; Q6_K works
//! in two 128-element halves of four 32-element quarters.

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
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
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

/// Reads a little-endian f16 at `b[at..at + 2]` and widens it (exactly) to f32.
#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Unpacks the 6-bit scale and min of sub-block `j` (0..8) from the 12-byte
/// K-quant scale field; ggml's `get_scale_min_k4`.
#[inline]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Calls `f` for each sub-block of one row of a quantised type, in order.
/// `row` must hold whole blocks. Errors on float types.
pub fn for_each_subblock(
    ty: GgmlType,
    row: &[u8],
    mut f: impl FnMut(&AffineSubBlock),
) -> Result<()> {
    if ty.is_float() {
        return Err(ModelError::Other(format!(
            "for_each_subblock: {} is a float type, not a quantised one",
            ty.name()
        )));
    }
    let bb = ty.block_bytes();
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    if row.len() % bb != 0 {
        return Err(ModelError::Other(format!(
            "{} row of {} bytes is not a whole number of {}-byte blocks",
            ty.name(),
            row.len(),
            bb
        )));
    }
    let mut sb = AffineSubBlock {
        scale: 0.0,
        offset: -0.0,
        len: 32,
        q: [0; 32],
    };
    for b in row.chunks_exact(bb) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                sb.scale = f16_at(b, 0);
                let qs = if ty == GgmlType::Q4_0 {
                    sb.offset = -0.0;
                    &b[2..18]
                } else {
                    sb.offset = f16_at(b, 2);
                    &b[4..20]
                };
                let bias = if ty == GgmlType::Q4_0 { 8 } else { 0 };
                for (i, &x) in qs.iter().enumerate() {
                    sb.q[i] = (x & 0x0F) as i8 - bias;
                    sb.q[i + 16] = (x >> 4) as i8 - bias;
                }
                f(&sb);
            }
            GgmlType::Q8_0 => {
                sb.scale = f16_at(b, 0);
                sb.offset = -0.0;
                for (d, &x) in sb.q.iter_mut().zip(&b[2..34]) {
                    *d = x as i8;
                }
                f(&sb);
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let (qh, qs): (Option<&[u8]>, &[u8]) = if ty == GgmlType::Q4K {
                    (None, &b[16..144])
                } else {
                    (Some(&b[16..48]), &b[48..176])
                };
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, scales);
                    sb.scale = d * sc as f32;
                    sb.offset = -(dmin * m as f32);
                    let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                    let shift = 4 * (j % 2);
                    for l in 0..32 {
                        let mut q = (chunk[l] >> shift) & 0x0F;
                        if let Some(qh) = qh {
                            q |= ((qh[l] >> j) & 1) << 4;
                        }
                        sb.q[l] = q as i8;
                    }
                    f(&sb);
                }
            }
            GgmlType::Q6K => {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let scales = &b[192..208];
                let d = f16_at(b, 208);
                sb.offset = -0.0;
                sb.len = 16;
                for (s, &sc) in scales.iter().enumerate() {
                    sb.scale = d * (sc as i8) as f32;
                    for l in 0..16 {
                        let e = s * 16 + l;
                        let (h, r) = (e / 128, e % 128);
                        let lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
                        let hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
                        sb.q[l] = (lo | (hi << 4)) as i8 - 32;
                    }
                    f(&sb);
                }
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                unreachable!("float types rejected above")
            }
        }
    }
    Ok(())
}

/// Reference dequantisation of `out.len()` elements stored in `bytes`.
/// Bit-identical to gguf-py's `gguf.quants.dequantize`. `bytes` must hold
/// exactly `out.len()` elements (`ty.bytes_for(out.len())` bytes).
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let need = ty.bytes_for(out.len())?;
    if bytes.len() != need {
        return Err(ModelError::Other(format!(
            "dequantize_row: {} elements of {} need {} bytes, got {}",
            out.len(),
            ty.name(),
            need,
            bytes.len()
        )));
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            // A bf16 is the top half of an f32: widening is a shift, exact for
            // every bit pattern including NaNs.
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        _ => {
            let mut pos = 0;
            for_each_subblock(ty, bytes, |sb| {
                for (i, o) in out[pos..pos + sb.len].iter_mut().enumerate() {
                    *o = sb.value(i);
                }
                pos += sb.len;
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Loads `fixtures/quant/<TYPE>.json` written by `reference/quant_reference.py`.
    fn fixture(ty: GgmlType) -> (Vec<u8>, Vec<u32>) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/quant")
            .join(format!("{}.json", ty.name()));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"].as_str(), Some(ty.name()));
        assert_eq!(v["ggml_type"].as_u64(), Some(ty.id() as u64));
        let bytes = hex::decode(v["bytes_hex"].as_str().unwrap()).unwrap();
        let bits: Vec<u32> = v["f32_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(v["n_elements"].as_u64(), Some(bits.len() as u64));
        (bytes, bits)
    }

    #[test]
    fn dequantize_row_matches_gguf_py_fixtures_bit_exactly() {
        for ty in ALL {
            let (bytes, bits) = fixture(ty);
            assert!(!bits.is_empty());
            let mut out = vec![f32::NAN; bits.len()];
            dequantize_row(ty, &bytes, &mut out).unwrap();
            for (i, (o, &b)) in out.iter().zip(&bits).enumerate() {
                assert_eq!(
                    o.to_bits(),
                    b,
                    "{} element {i}: got {o:?}, gguf-py {:?}",
                    ty.name(),
                    f32::from_bits(b)
                );
            }
        }
    }

    #[test]
    fn subblock_values_equal_dequantize_row() {
        for ty in ALL.into_iter().filter(|t| !t.is_float()) {
            let (bytes, bits) = fixture(ty);
            let mut out = vec![0f32; bits.len()];
            dequantize_row(ty, &bytes, &mut out).unwrap();
            let mut vals = Vec::new();
            let mut n_sub = 0;
            for_each_subblock(ty, &bytes, |sb| {
                assert_eq!(sb.len, subblock_len(ty));
                n_sub += 1;
                for i in 0..sb.len {
                    vals.push(sb.value(i));
                }
            })
            .unwrap();
            assert_eq!(n_sub, bits.len() / subblock_len(ty), "{}", ty.name());
            let a: Vec<u32> = vals.iter().map(|v| v.to_bits()).collect();
            let b: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert_eq!(a, b, "{}", ty.name());
        }
    }

    /// Hand-built Q4_0 block: element order is low nibbles first, then high.
    #[test]
    fn q4_0_nibble_order() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        for i in 0..16 {
            b[2 + i] = (i as u8) | ((15 - i as u8) << 4);
        }
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q4_0, &b, &mut out).unwrap();
        for i in 0..16 {
            assert_eq!(out[i], i as f32 - 8.0);
            assert_eq!(out[16 + i], 7.0 - i as f32);
        }
    }

    /// Q8_0 with a negative scale and q = 0 must give -0.0 like `d * q` does.
    #[test]
    fn zero_offset_keeps_negative_zero() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&half::f16::from_f32(-0.5).to_bits().to_le_bytes());
        b[3] = 2; // element 1 = -1.0
        let mut out = [1f32; 32];
        dequantize_row(GgmlType::Q8_0, &b, &mut out).unwrap();
        assert_eq!(out[0].to_bits(), (-0.0f32).to_bits());
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = vec![0f32; 32];
        // One byte short / long of a Q4_0 block.
        assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
        assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 19], &mut out).is_err());
        // Not a whole number of blocks of elements.
        assert!(dequantize_row(GgmlType::Q6K, &[0u8; 210], &mut out[..31]).is_err());
        assert!(dequantize_row(GgmlType::F32, &[0u8; 12], &mut out[..4]).is_err());
        assert!(dequantize_row(GgmlType::F32, &[0u8; 16], &mut out[..4]).is_ok());
        assert!(for_each_subblock(GgmlType::Q4K, &[0u8; 143], |_| {}).is_err());
        assert!(for_each_subblock(GgmlType::F16, &[0u8; 2], |_| {}).is_err());
        let mut n = 0;
        for_each_subblock(GgmlType::Q5K, &[], |_| n += 1).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn ids_round_trip_and_unknown_names() {
        for ty in ALL {
            assert_eq!(GgmlType::from_id(ty.id()).unwrap(), ty);
            assert_eq!(
                ty.bytes_for(ty.block_elems() * 3).unwrap(),
                ty.block_bytes() * 3
            );
        }
        let e = GgmlType::from_id(6).unwrap_err().to_string();
        assert!(e.contains("Q5_0"), "{e}");
    }
}
