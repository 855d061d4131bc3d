//! RWKV-7 forward on the CPU, one token at a time, in f64. It reads like the
//! official `rwkv_v7_demo_rnn.py`; see `model::v7` for the numbered steps.

use crate::error::Result;
use crate::loader::SafeTensorsFile;
use crate::reference::{layer_norm, matvec, sigmoid, vecmat};

struct Block {
    ln1: (Vec<f64>, Vec<f64>),
    ln2: (Vec<f64>, Vec<f64>),
    x: [Vec<f64>; 6], // x_r, x_w, x_k, x_v, x_a, x_g
    w0: Vec<f64>,
    w1: Vec<f64>,
    w2: Vec<f64>,
    a0: Vec<f64>,
    a1: Vec<f64>,
    a2: Vec<f64>,
    v: Option<(Vec<f64>, Vec<f64>, Vec<f64>)>, // v0, v1, v2 (not on layer 0)
    g1: Vec<f64>,
    g2: Vec<f64>,
    k_k: Vec<f64>,
    k_a: Vec<f64>,
    r_k: Vec<f64>,
    wr: Vec<f64>,
    wk: Vec<f64>,
    wv: Vec<f64>,
    wo: Vec<f64>,
    ln_x: (Vec<f64>, Vec<f64>),
    ffn_x_k: Vec<f64>,
    ffn_key: Vec<f64>,
    ffn_value: Vec<f64>,
}

pub struct V7 {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub head_size: usize,
    pub vocab: usize,
    emb: Vec<f64>,
    ln0: (Vec<f64>, Vec<f64>),
    blocks: Vec<Block>,
    ln_out: (Vec<f64>, Vec<f64>),
    head: Vec<f64>,
}

/// One sequence's state, in the golden layout.
#[derive(Clone, Debug)]
pub struct RefState {
    pub att_x: Vec<f64>,  // [L, C]
    pub ffn_x: Vec<f64>,  // [L, C]
    pub att_kv: Vec<f64>, // [L, H, N(value i), N(key j)]
}

impl V7 {
    pub fn load(f: &SafeTensorsFile) -> Result<Self> {
        let t = |name: &str| -> Result<Vec<f64>> { Ok(f.get(name)?.to_f64()) };
        let emb_shape = f.get("emb.weight")?.shape.to_vec();
        let (vocab, n_embd) = (emb_shape[0], emb_shape[1]);
        let rk = f.get("blocks.0.att.r_k")?.shape.to_vec();
        let mut blocks = Vec::new();
        while f.contains(&format!("blocks.{}.ln1.weight", blocks.len())) {
            let l = blocks.len();
            let p = |n: &str| format!("blocks.{l}.{n}");
            blocks.push(Block {
                ln1: (t(&p("ln1.weight"))?, t(&p("ln1.bias"))?),
                ln2: (t(&p("ln2.weight"))?, t(&p("ln2.bias"))?),
                x: [
                    t(&p("att.x_r"))?,
                    t(&p("att.x_w"))?,
                    t(&p("att.x_k"))?,
                    t(&p("att.x_v"))?,
                    t(&p("att.x_a"))?,
                    t(&p("att.x_g"))?,
                ],
                w0: t(&p("att.w0"))?,
                w1: t(&p("att.w1"))?,
                w2: t(&p("att.w2"))?,
                a0: t(&p("att.a0"))?,
                a1: t(&p("att.a1"))?,
                a2: t(&p("att.a2"))?,
                v: if l > 0 { Some((t(&p("att.v0"))?, t(&p("att.v1"))?, t(&p("att.v2"))?)) } else { None },
                g1: t(&p("att.g1"))?,
                g2: t(&p("att.g2"))?,
                k_k: t(&p("att.k_k"))?,
                k_a: t(&p("att.k_a"))?,
                r_k: t(&p("att.r_k"))?,
                wr: t(&p("att.receptance.weight"))?,
                wk: t(&p("att.key.weight"))?,
                wv: t(&p("att.value.weight"))?,
                wo: t(&p("att.output.weight"))?,
                ln_x: (t(&p("att.ln_x.weight"))?, t(&p("att.ln_x.bias"))?),
                ffn_x_k: t(&p("ffn.x_k"))?,
                ffn_key: t(&p("ffn.key.weight"))?,
                ffn_value: t(&p("ffn.value.weight"))?,
            });
        }
        Ok(Self {
            n_layer: blocks.len(),
            n_embd,
            n_head: rk[0],
            head_size: rk[1],
            vocab,
            emb: t("emb.weight")?,
            ln0: (t("blocks.0.ln0.weight")?, t("blocks.0.ln0.bias")?),
            blocks,
            ln_out: (t("ln_out.weight")?, t("ln_out.bias")?),
            head: t("head.weight")?,
        })
    }

    pub fn new_state(&self) -> RefState {
        let (l, c) = (self.n_layer, self.n_embd);
        RefState { att_x: vec![0.0; l * c], ffn_x: vec![0.0; l * c], att_kv: vec![0.0; l * c * self.head_size] }
    }

    /// Reads one token and returns its logits `[vocab]`.
    pub fn forward(&self, state: &mut RefState, token: u32) -> Vec<f64> {
        let (c, nh, n) = (self.n_embd, self.n_head, self.head_size);
        let e = &self.emb[token as usize * c..(token as usize + 1) * c];
        let mut x = layer_norm(e, &self.ln0.0, &self.ln0.1, 1e-5);
        let mut v_first = vec![0.0; c];
        for (l, b) in self.blocks.iter().enumerate() {
            // Time mix.
            let xx = layer_norm(&x, &b.ln1.0, &b.ln1.1, 1e-5);
            let prev = &mut state.att_x[l * c..(l + 1) * c];
            let mix = |m: &[f64]| -> Vec<f64> { (0..c).map(|i| xx[i] + (prev[i] - xx[i]) * m[i]).collect() };
            let [xr, xw, xk, xv, xa, xg] = [0, 1, 2, 3, 4, 5].map(|i| mix(&b.x[i]));
            prev.copy_from_slice(&xx);

            let r = matvec(&b.wr, &xr);
            let mut k = matvec(&b.wk, &xk);
            let mut v = matvec(&b.wv, &xv);
            let w_lora = vecmat(&vecmat(&xw, &b.w1).iter().map(|v| v.tanh()).collect::<Vec<_>>(), &b.w2);
            let w: Vec<f64> = (0..c).map(|i| (-(-0.5f64).exp() * sigmoid(b.w0[i] + w_lora[i])).exp()).collect();
            let a_lora = vecmat(&vecmat(&xa, &b.a1), &b.a2);
            let a: Vec<f64> = (0..c).map(|i| sigmoid(b.a0[i] + a_lora[i])).collect();
            let g = vecmat(&vecmat(&xg, &b.g1).iter().map(|v| sigmoid(*v)).collect::<Vec<_>>(), &b.g2);
            match &b.v {
                None => v_first.copy_from_slice(&v),
                Some((v0, v1, v2)) => {
                    let gate = vecmat(&vecmat(&xv, v1), v2);
                    for i in 0..c {
                        v[i] += (v_first[i] - v[i]) * sigmoid(v0[i] + gate[i]);
                    }
                }
            }
            let mut kk: Vec<f64> = (0..c).map(|i| k[i] * b.k_k[i]).collect();
            for h in kk.chunks_exact_mut(n) {
                let norm = h.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
                h.iter_mut().for_each(|v| *v /= norm);
            }
            for i in 0..c {
                k[i] *= 1.0 + (a[i] - 1.0) * b.k_a[i];
            }

            // WKV: S = S diag(w) - (S kk)(kk a)^T + v k^T ; y = S r, per head.
            let mut y = vec![0.0; c];
            for h in 0..nh {
                let s = &mut state.att_kv[(l * nh + h) * n * n..(l * nh + h + 1) * n * n];
                let o = h * n;
                for i in 0..n {
                    let row = &mut s[i * n..(i + 1) * n];
                    let sa: f64 = (0..n).map(|j| row[j] * kk[o + j]).sum();
                    for j in 0..n {
                        row[j] = row[j] * w[o + j] - sa * kk[o + j] * a[o + j] + v[o + i] * k[o + j];
                    }
                    y[o + i] = (0..n).map(|j| row[j] * r[o + j]).sum();
                }
            }
            // GroupNorm per head, bonus, gate.
            for h in 0..nh {
                let o = h * n;
                let gn = layer_norm(&y[o..o + n], &b.ln_x.0[o..o + n], &b.ln_x.1[o..o + n], 64e-5);
                let bonus: f64 = (0..n).map(|j| r[o + j] * k[o + j] * b.r_k[o + j]).sum();
                for i in 0..n {
                    y[o + i] = (gn[i] + bonus * v[o + i]) * g[o + i];
                }
            }
            let out = matvec(&b.wo, &y);
            x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);

            // Channel mix.
            let xx = layer_norm(&x, &b.ln2.0, &b.ln2.1, 1e-5);
            let prev = &mut state.ffn_x[l * c..(l + 1) * c];
            let xk: Vec<f64> = (0..c).map(|i| xx[i] + (prev[i] - xx[i]) * b.ffn_x_k[i]).collect();
            prev.copy_from_slice(&xx);
            let hidden: Vec<f64> = matvec(&b.ffn_key, &xk).iter().map(|v| v.max(0.0).powi(2)).collect();
            let out = matvec(&b.ffn_value, &hidden);
            x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
        }
        let x = layer_norm(&x, &self.ln_out.0, &self.ln_out.1, 1e-5);
        matvec(&self.head, &x)
    }
}
