//! Plain-Rust CPU reference of the forward pass, in f64. Used by tests to
//! check the GPU kernels and the end-to-end logits; never on the hot path.

pub mod v7;

/// `y = (x - mean) / sqrt(var + eps) * w + b` (biased variance).
pub fn layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let rstd = 1.0 / (var + eps).sqrt();
    x.iter().zip(w.iter().zip(b)).map(|(v, (w, b))| (v - mean) * rstd * w + b).collect()
}

/// `y = W x` for a row-major `W [rows, cols]` (the `x @ W.T` of the checkpoints).
pub fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    let cols = x.len();
    w.chunks_exact(cols).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

/// `y = x W` for a row-major `W [rows = x.len(), cols]` (LoRA layout).
pub fn vecmat(x: &[f64], w: &[f64]) -> Vec<f64> {
    let cols = w.len() / x.len();
    let mut y = vec![0.0; cols];
    for (xi, row) in x.iter().zip(w.chunks_exact(cols)) {
        for (yj, wij) in y.iter_mut().zip(row) {
            *yj += xi * wij;
        }
    }
    y
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
