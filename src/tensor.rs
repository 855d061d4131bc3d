//! Element types and borrowed tensor views: what every other module reads
//! weights as. A leaf module: it depends on nothing else in the crate.

use half::{bf16, f16};

/// Element types the runtime reads from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }
}

/// Little-endian elements of `dtype` widened to f32 (exact).
pub fn widen(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

/// A borrowed view of one tensor in the mapping.
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Little-endian element bytes, row-major.
    pub bytes: &'a [u8],
}

impl Tensor<'_> {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32 (exact for all three dtypes).
    #[inline]
    pub fn at(&self, i: usize) -> f32 {
        let b = self.bytes;
        match self.dtype {
            Dtype::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
            Dtype::F16 => f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            Dtype::BF16 => bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        widen(self.dtype, self.bytes)
    }

    pub fn to_f64(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.at(i) as f64).collect()
    }

    /// The bytes of a 2-D tensor `[rows, cols]` transposed to `[cols, rows]`,
    /// in the same dtype (a pure permutation, so exact).
    pub fn transposed_bytes(&self) -> Vec<u8> {
        self.transposed_bytes_padded(self.shape[1], self.shape[0])
    }

    /// As [`Tensor::transposed_bytes`], placed in the top-left corner of a
    /// zero `[out_rows, out_cols]` matrix (`out_rows >= cols`, `out_cols >= rows`).
    pub fn transposed_bytes_padded(&self, out_rows: usize, out_cols: usize) -> Vec<u8> {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        assert!(out_rows >= cols && out_cols >= rows, "padding must not shrink the matrix");
        let s = self.dtype.size();
        let mut out = vec![0u8; out_rows * out_cols * s];
        for r in 0..rows {
            for c in 0..cols {
                let src = (r * cols + c) * s;
                let dst = (c * out_cols + r) * s;
                out[dst..dst + s].copy_from_slice(&self.bytes[src..src + s]);
            }
        }
        out
    }
}
