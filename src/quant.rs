//! Block quantization of weight matrices (issue 14, first step: the CPU
//! quantizers and their exact dequantization; the GPU kernels that read
//! the blocks are to come).
//!
//! A `[rows, cols]` matrix is cut along its input dimension (`cols`) into
//! blocks of `block` weights; each block keeps one f16 scale `s` and one
//! code per weight, and a weight reads back as `code_value · s`:
//! - `Int8`: symmetric absmax, codes −127..=127, `s ≥ absmax / 127`;
//! - `Q4`: symmetric absmax, codes −7..=7 (two per byte), `s ≥ absmax / 7`;
//! - `Nf4`: the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023: the
//!   quantiles of a normal distribution, scaled to [−1, 1], with an exact
//!   0), `s ≥ absmax`, codes index the levels (two per byte).
//!
//! The scale is the f16 value nearest its ideal, rounded up when nearest
//! is below it, so no code is ever clamped: every weight is within half a
//! step of its code (`max_error`).

use half::f16;

use crate::error::{Error, Result};

/// The 16 NF4 levels, ascending.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A code format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Int8,
    Q4,
    Nf4,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Int8 => "int8",
            Format::Q4 => "q4",
            Format::Nf4 => "nf4",
        }
    }

    /// Bits of one code.
    pub fn bits(self) -> usize {
        match self {
            Format::Int8 => 8,
            Format::Q4 | Format::Nf4 => 4,
        }
    }

    /// The largest code value in scale units (`s` is absmax / this).
    fn top(self) -> f32 {
        match self {
            Format::Int8 => 127.0,
            Format::Q4 => 7.0,
            Format::Nf4 => 1.0,
        }
    }

    /// The value of code `c` in scale units.
    fn value(self, c: u8) -> f32 {
        match self {
            Format::Int8 => c as i8 as f32,
            Format::Q4 => c as f32 - 8.0,
            Format::Nf4 => NF4_LEVELS[c as usize & 15],
        }
    }

    /// The code nearest `v` (in scale units, |v| ≤ top).
    fn code(self, v: f32) -> u8 {
        match self {
            Format::Int8 => v.round().clamp(-127.0, 127.0) as i8 as u8,
            Format::Q4 => (v.round().clamp(-7.0, 7.0) + 8.0) as u8,
            Format::Nf4 => {
                // The levels ascend: the nearest is at the first midpoint above v.
                let mut c = 15;
                for i in 0..15 {
                    if v < (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) * 0.5 {
                        c = i;
                        break;
                    }
                }
                c as u8
            }
        }
    }

    /// Largest distance from a weight to its code's value, in scale units:
    /// half the widest step between neighbouring code values.
    pub fn half_step(self) -> f32 {
        match self {
            Format::Int8 | Format::Q4 => 0.5,
            Format::Nf4 => NF4_LEVELS.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) * 0.5,
        }
    }
}

/// A format and its block size along the input dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scheme {
    pub format: Format,
    pub block: usize,
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.format.name(), self.block)
    }
}

/// A quantized `[rows, cols]` matrix: codes row by row (int8: a byte each;
/// 4-bit: two a byte, the lower nibble first) and one scale per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub scheme: Scheme,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    /// `[rows, cols / block]`.
    pub scales: Vec<f16>,
}

impl Quantized {
    /// Bytes of codes and scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }

    fn code(&self, i: usize) -> u8 {
        match self.scheme.format.bits() {
            8 => self.codes[i],
            _ => (self.codes[i / 2] >> (4 * (i % 2))) & 15,
        }
    }

    /// The weights the codes stand for, `[rows, cols]` f32 (each exactly
    /// `value · scale`: a code value times an f16 fits f32's mantissa).
    pub fn dequantize(&self) -> Vec<f32> {
        let b = self.scheme.block;
        (0..self.rows * self.cols)
            .map(|i| self.scheme.format.value(self.code(i)) * self.scales[i / b].to_f32())
            .collect()
    }
}

/// Which axis of an official RWKV tensor is a matrix's input (the axis
/// blocks run along): 1 for a `[out, in]` projection or head (`*.weight`
/// of rank 2), 0 for a v7 LoRA stored `[in, out]` (`att.w1`, `att.w2`,
/// `a1`, `a2`, `v1`, `v2`, `g1`, `g2`); `None` for what is not a matrix
/// product's weight (vectors, `r_k`, the embedding, which is read by row).
pub fn input_axis(name: &str, shape: &[usize]) -> Option<usize> {
    if shape.len() != 2 || name == "emb.weight" {
        return None;
    }
    const LORAS: [&str; 8] = ["w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"];
    let last = name.rsplit('.').next().unwrap_or("");
    if name.contains(".att.") && LORAS.contains(&last) {
        Some(0)
    } else if last == "weight" {
        Some(1)
    } else {
        None
    }
}

/// An official RWKV tensor quantized by `scheme` and read back in its own
/// layout, if it is a matrix (see [`input_axis`]); `None` otherwise. Blocks
/// run along the input; an input the block does not divide (a v7 LoRA's 32
/// under blocks of 64) takes blocks of 32. For measuring a scheme's quality
/// with the float kernels before reading blocks on the GPU.
pub fn round_trip(scheme: Scheme, name: &str, shape: &[usize], values: &[f32]) -> Result<Option<Vec<f32>>> {
    let Some(axis) = input_axis(name, shape) else { return Ok(None) };
    let (rows, cols) = if axis == 1 { (shape[0], shape[1]) } else { (shape[1], shape[0]) };
    let as_rows = if axis == 1 { values.to_vec() } else { transpose(values, shape[0], shape[1]) };
    let block = if cols.is_multiple_of(scheme.block) { scheme.block } else { 32 };
    let back = quantize(Scheme { block, ..scheme }, &as_rows, rows, cols)?.dequantize();
    Ok(Some(if axis == 1 { back } else { transpose(&back, rows, cols) }))
}

/// `[rows, cols]` to `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// The smallest f16 at least `x` (x finite, ≥ 0), or an error past f16's range.
fn scale_up(x: f32) -> Option<f16> {
    let h = f16::from_f32(x);
    if !h.is_finite() {
        return None;
    }
    if h.to_f32() >= x {
        return Some(h);
    }
    let up = f16::from_bits(h.to_bits() + 1);
    up.is_finite().then_some(up)
}

/// Quantizes a `[rows, cols]` matrix; `cols` must be a multiple of the block.
pub fn quantize(scheme: Scheme, values: &[f32], rows: usize, cols: usize) -> Result<Quantized> {
    let b = scheme.block;
    if b == 0 || !cols.is_multiple_of(b) || values.len() != rows * cols {
        return Err(Error::InvalidArgument(format!(
            "quantizing a [{rows}, {cols}] matrix ({} values) in blocks of {b}: the columns must be a multiple of the block",
            values.len()
        )));
    }
    let f = scheme.format;
    let mut scales = Vec::with_capacity(rows * cols / b);
    let mut codes = vec![0u8; (rows * cols * f.bits()).div_ceil(8)];
    for (k, blk) in values.chunks_exact(b).enumerate() {
        let absmax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        if blk.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!("block {k} of the matrix holds a non-finite weight")));
        }
        let s = scale_up(absmax / f.top()).ok_or_else(|| {
            Error::InvalidArgument(format!("block {k}: weights up to {absmax} need a scale past f16's range"))
        })?;
        scales.push(s);
        let inv = if s.to_f32() > 0.0 { 1.0 / s.to_f32() } else { 0.0 };
        for (j, &v) in blk.iter().enumerate() {
            let c = f.code(v * inv);
            let i = k * b + j;
            match f.bits() {
                8 => codes[i] = c,
                _ => codes[i / 2] |= c << (4 * (i % 2)),
            }
        }
    }
    Ok(Quantized { scheme, rows, cols, codes, scales })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::sampler::SplitMix64(seed);
        // Roughly normal (sum of four uniforms), with an outlier per 97.
        (0..n)
            .map(|i| {
                let u: f32 = (0..4).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).sum();
                if i % 97 == 0 {
                    u * 20.0
                } else {
                    u * 0.05
                }
            })
            .collect()
    }

    const SCHEMES: [Scheme; 6] = [
        Scheme { format: Format::Int8, block: 32 },
        Scheme { format: Format::Int8, block: 64 },
        Scheme { format: Format::Q4, block: 32 },
        Scheme { format: Format::Q4, block: 64 },
        Scheme { format: Format::Nf4, block: 32 },
        Scheme { format: Format::Nf4, block: 64 },
    ];

    /// f32's rounding of x / s, relative to the largest code value (a few ulps:
    /// it can only move a weight at a rounding tie to the neighbouring code).
    const DIVISION_ULPS: f32 = 1e-6;

    /// Every weight reads back within half a step of its scale, and codes
    /// re-quantized from the values they stand for are the same codes.
    #[test]
    fn round_trip_within_half_a_step_and_stable() {
        let (rows, cols) = (5, 192);
        let w = weights(rows * cols, 7);
        for scheme in SCHEMES {
            let q = quantize(scheme, &w, rows, cols).unwrap();
            assert_eq!(q.bytes(), rows * cols * scheme.format.bits() / 8 + 2 * rows * cols / scheme.block);
            let d = q.dequantize();
            for (i, (&x, &y)) in w.iter().zip(&d).enumerate() {
                let s = q.scales[i / scheme.block].to_f32();
                let bound = s * (scheme.format.half_step() + DIVISION_ULPS * scheme.format.top());
                assert!((x - y).abs() <= bound, "{scheme} weight {i}: {x} read back as {y} (scale {s})");
            }
            let again = quantize(scheme, &d, rows, cols).unwrap();
            assert_eq!(again.codes, q.codes, "{scheme}: codes of the read-back values");
            assert_eq!(again.dequantize(), d, "{scheme}: read back twice");
        }
    }

    #[test]
    fn scales_round_up_and_zero_blocks_are_zero() {
        for x in [1e-8f32, 0.1, 1.0 / 3.0, 1000.0, 65504.0] {
            let s = scale_up(x).unwrap();
            assert!(s.to_f32() >= x && f16::from_bits(s.to_bits() - 1).to_f32() < x, "{x} -> {s}");
        }
        assert!(scale_up(1e6).is_none());
        let q = quantize(SCHEMES[0], &[0.0; 64], 2, 32).unwrap();
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
        // The NF4 levels ascend and the nearest is chosen.
        assert!(NF4_LEVELS.windows(2).all(|w| w[0] < w[1]));
        for (i, &l) in NF4_LEVELS.iter().enumerate() {
            assert_eq!(Format::Nf4.code(l) as usize, i);
        }
    }

    #[test]
    fn matrices_are_found_by_official_name() {
        assert_eq!(input_axis("blocks.3.att.key.weight", &[768, 768]), Some(1));
        assert_eq!(input_axis("head.weight", &[65536, 768]), Some(1));
        assert_eq!(input_axis("blocks.0.att.w1", &[768, 64]), Some(0));
        assert_eq!(input_axis("blocks.0.att.g2", &[128, 768]), Some(0));
        assert_eq!(input_axis("emb.weight", &[65536, 768]), None);
        assert_eq!(input_axis("blocks.0.att.r_k", &[12, 64]), None);
        assert_eq!(input_axis("blocks.0.ln1.weight", &[768]), None);
        // A LoRA [in 32, out 64] is quantized as its [64, 32] rows, in blocks of 32
        // (64 does not divide its input), and read back in its own layout.
        let w = weights(32 * 64, 3);
        let back = round_trip(Scheme { format: Format::Int8, block: 64 }, "blocks.0.att.a2", &[32, 64], &w).unwrap();
        let rows = transpose(&w, 32, 64);
        let want = quantize(Scheme { format: Format::Int8, block: 32 }, &rows, 64, 32).unwrap().dequantize();
        assert_eq!(back, Some(transpose(&want, 64, 32)));
        assert_eq!(round_trip(SCHEMES[0], "blocks.0.att.r_k", &[12, 64], &w[..768]).unwrap(), None);
    }

    #[test]
    fn bad_matrices_are_errors() {
        let s = SCHEMES[0];
        assert!(quantize(s, &[0.0; 40], 1, 40).is_err(), "40 columns in blocks of 32");
        assert!(quantize(s, &[0.0; 32], 2, 32).is_err(), "too few values");
        assert!(quantize(s, &[f32::NAN; 32], 1, 32).is_err());
        assert!(quantize(s, &[1e9; 32], 1, 32).is_err(), "scale past f16");
        assert!(quantize(Scheme { format: Format::Q4, block: 0 }, &[0.0; 32], 1, 32).is_err());
    }
}
