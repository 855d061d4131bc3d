//! Choosing the next token from logits.
//!
//! Order of operations: logit bias → repetition / presence / frequency
//! penalties → (temperature 0: argmax) → top-k → softmax at the temperature
//! → top-p → min-p → draw. Penalties count the tokens accepted so far; with
//! `penalty_decay < 1` every count decays by that factor per accepted token,
//! as the RWKV chat tools do.
//!
//! The random generator is a SplitMix64 written here rather than taken from
//! `rand`: `rand` does not promise the same stream across versions, and the
//! promise we make (same seed, model and prompt → same output) must survive
//! dependency upgrades. One u64 per token is all a sampler needs.

use std::collections::HashMap;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// p (at least one token); 1 keeps all.
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p × the top probability; 0 keeps all.
    pub min_p: f32,
    /// Subtracted once from the logit of every token seen.
    pub presence_penalty: f32,
    /// Subtracted per (decayed) occurrence of a token.
    pub frequency_penalty: f32,
    /// llama.cpp-style: seen tokens' logits divided (if positive) or
    /// multiplied (if negative) by this; 1 disables.
    pub repetition_penalty: f32,
    /// Per-token decay of occurrence counts (1: no decay).
    pub penalty_decay: f32,
    /// Added to the logits of the given tokens (-inf bans a token).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            penalty_decay: 1.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidArgument(what.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad("top-p must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p must be between 0 and 1");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition penalty must be a finite number > 0");
        }
        if !(0.0..=1.0).contains(&self.penalty_decay) {
            return bad("penalty decay must be between 0 and 1");
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("penalties must be finite");
        }
        if self.logit_bias.iter().any(|(_, b)| b.is_nan() || *b == f32::INFINITY) {
            return bad("a logit bias must be a number or -inf");
        }
        Ok(())
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
    /// Decayed occurrence count of each token accepted so far.
    counts: HashMap<u32, f32>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { rng: SplitMix64(cfg.seed), cfg, counts: HashMap::new() })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Records a token as generated (for the penalties).
    pub fn accept(&mut self, token: u32) {
        if self.cfg.penalty_decay < 1.0 {
            for c in self.counts.values_mut() {
                *c *= self.cfg.penalty_decay;
            }
        }
        *self.counts.entry(token).or_insert(0.0) += 1.0;
    }

    /// Forgets the accepted tokens.
    pub fn reset(&mut self) {
        self.counts.clear();
    }

    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let cfg = &self.cfg;
        if logits.iter().any(|v| v.is_nan()) {
            return Err(Error::InvalidArgument("the logits contain NaN".into()));
        }
        let mut l = logits.to_vec();
        for &(t, b) in &cfg.logit_bias {
            if let Some(v) = l.get_mut(t as usize) {
                // Kept finite as the penalties are (-inf, a ban, stays -inf).
                *v = if b == f32::NEG_INFINITY || *v == f32::NEG_INFINITY {
                    f32::NEG_INFINITY
                } else {
                    (*v as f64 + b as f64).clamp(-f32::MAX as f64, f32::MAX as f64) as f32
                };
            }
        }
        // Penalties in f64, the result kept within f32's finite range: an
        // extreme penalty (presence -3e38, repetition 1e-40) must move a
        // logit as far as f32 allows, not to +inf, whose probabilities would
        // be NaN. A banned token (-inf) stays banned.
        for (&t, &n) in &self.counts {
            if let Some(v) = l.get_mut(t as usize) {
                if *v == f32::NEG_INFINITY {
                    continue;
                }
                let mut x = *v as f64;
                if cfg.repetition_penalty != 1.0 {
                    let r = cfg.repetition_penalty as f64;
                    x = if x > 0.0 { x / r } else { x * r };
                }
                x -= cfg.presence_penalty as f64 + n as f64 * cfg.frequency_penalty as f64;
                *v = x.clamp(-f32::MAX as f64, f32::MAX as f64) as f32;
            }
        }
        // Candidates: (token, logit), most likely first.
        let mut cand: Vec<(u32, f32)> =
            l.iter().enumerate().filter(|(_, v)| **v > f32::NEG_INFINITY).map(|(i, v)| (i as u32, *v)).collect();
        if cand.is_empty() {
            return Err(Error::InvalidArgument("every token is masked (all logits are -inf)".into()));
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if cfg.temperature == 0.0 {
            return Ok(cand[0].0);
        }
        if cfg.top_k > 0 {
            cand.truncate(cfg.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, v)| (((*v - max) / cfg.temperature) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if cfg.min_p > 0.0 {
            let floor = probs[0] * cfg.min_p as f64;
            let keep = probs.iter().take_while(|p| **p >= floor).count().max(1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r < 0.0 {
                return Ok(cand[i].0);
            }
        }
        Ok(cand[probs.len() - 1].0)
    }
}

/// A token's log probability under the model's own distribution (the
/// log-softmax of the raw logits, before logit bias, penalties and
/// temperature, as vLLM reports by default), and the `top` most likely
/// tokens with theirs (most likely first; equal logits by lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprob`] of `token` under `logits`, summed in f64.
pub fn logprob(logits: &[f32], token: u32, top: usize) -> Result<TokenLogprob> {
    let Some(&chosen) = logits.get(token as usize) else {
        return Err(Error::InvalidArgument(format!("token {token} is out of range ({} logits)", logits.len())));
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || logits.iter().any(|v| v.is_nan()) {
        return Err(Error::InvalidArgument("the logits are not finite".into()));
    }
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |v: f32| (v as f64 - lse) as f32;
    // The `top` largest, kept sorted (top is small: at most 20).
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &v) in logits.iter().enumerate() {
            if best.len() == top && v <= best[top - 1].1 {
                continue;
            }
            let place = best.partition_point(|&(_, b)| b >= v);
            best.insert(place, (i as u32, v));
            best.truncate(top);
        }
    }
    Ok(TokenLogprob { token, logprob: lp(chosen), top: best.into_iter().map(|(t, v)| (t, lp(v))).collect() })
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-tested 64-bit generator.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        let want = |t: usize| ((logits[t] as f64).exp() / z).ln() as f32;
        let r = logprob(&logits, 4, 3).unwrap();
        assert_eq!(r.token, 4);
        assert_eq!(r.logprob, want(4));
        // Equal logits: the lower id first.
        assert_eq!(r.top, vec![(1, want(1)), (3, want(3)), (0, want(0))]);
        assert!(logprob(&logits, 0, 0).unwrap().top.is_empty());
        assert_eq!(logprob(&logits, 2, 9).unwrap().top.len(), 5);
        assert!(logprob(&logits, 5, 1).is_err());
        assert!(logprob(&[f32::NAN, 0.0], 1, 1).is_err());
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, -1.0]
    }

    fn draw(cfg: SamplerConfig, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(cfg).unwrap();
        (0..n).map(|_| s.sample(logits).unwrap()).collect()
    }

    fn distinct(v: &[u32]) -> Vec<u32> {
        let mut d = v.to_vec();
        d.sort();
        d.dedup();
        d
    }

    /// Extreme penalties (issue 12): a presence penalty of -3e38 or a
    /// repetition penalty of 1e-40 used to push a logit to +inf, the
    /// probabilities became NaN and the least likely token came out. Both
    /// boost the repeated token as far as f32 goes: it is always drawn.
    #[test]
    fn extreme_penalties_stay_finite() {
        // (penalty, the repeated token): neither is the least likely token,
        // which the old NaN probabilities picked; the repetition penalty
        // divides positive logits, so its token has one.
        let cases = [
            (SamplerConfig { presence_penalty: -3e38, frequency_penalty: -3e38, ..Default::default() }, 2),
            (SamplerConfig { repetition_penalty: 1e-40, ..Default::default() }, 3),
        ];
        for (cfg, token) in cases {
            for seed in 0..20 {
                let mut s = Sampler::new(SamplerConfig { seed, ..cfg.clone() }).unwrap();
                s.accept(token);
                assert_eq!(s.sample(&logits()).unwrap(), token, "{cfg:?}");
            }
        }
        // A banned token stays banned under any penalty.
        let cfg =
            SamplerConfig { presence_penalty: -3e38, logit_bias: vec![(4, f32::NEG_INFINITY)], ..Default::default() };
        let mut s = Sampler::new(cfg).unwrap();
        s.accept(4);
        assert_ne!(s.sample(&logits()).unwrap(), 4);
    }

    #[test]
    fn temperature_zero_is_argmax() {
        assert_eq!(draw(SamplerConfig::greedy(), &logits(), 5), vec![1; 5]);
    }

    #[test]
    fn ties_break_to_the_lowest_id() {
        assert_eq!(draw(SamplerConfig::greedy(), &[2.0, 5.0, 5.0], 1), vec![1]);
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let cfg = |seed| SamplerConfig { seed, ..Default::default() };
        let a = draw(cfg(7), &logits(), 200);
        assert_eq!(a, draw(cfg(7), &logits(), 200));
        assert_ne!(a, draw(cfg(8), &logits(), 200));
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // p(1) = e^3 / sum ≈ 0.61 at temperature 1.
        let d = draw(SamplerConfig { seed: 1, ..Default::default() }, &logits(), 20_000);
        let share = d.iter().filter(|&&t| t == 1).count() as f64 / d.len() as f64;
        let l = logits();
        let z: f64 = l.iter().map(|v| (*v as f64).exp()).sum();
        let want = (3f64).exp() / z;
        assert!((share - want).abs() < 0.02, "share {share} vs {want}");
    }

    #[test]
    fn high_temperature_flattens_low_sharpens() {
        let share = |t: f32| {
            let d = draw(SamplerConfig { temperature: t, seed: 3, ..Default::default() }, &logits(), 5000);
            d.iter().filter(|&&x| x == 1).count() as f64 / d.len() as f64
        };
        assert!(share(0.2) > 0.95);
        assert!(share(5.0) < 0.35);
    }

    #[test]
    fn top_k_keeps_k_and_k_larger_than_vocab_keeps_all() {
        let d = draw(SamplerConfig { top_k: 2, seed: 1, ..Default::default() }, &logits(), 2000);
        assert_eq!(distinct(&d), vec![1, 2]);
        let d = draw(SamplerConfig { top_k: 1000, temperature: 50.0, seed: 1, ..Default::default() }, &logits(), 2000);
        assert_eq!(distinct(&d), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn top_p_zero_is_the_top_token_and_p_selects_the_nucleus() {
        let d = draw(SamplerConfig { top_p: 0.0, seed: 1, ..Default::default() }, &logits(), 200);
        assert_eq!(distinct(&d), vec![1]);
        // p(1) ≈ 0.61, p(2) ≈ 0.22: top-p 0.7 keeps exactly {1, 2}.
        let d = draw(SamplerConfig { top_p: 0.7, seed: 1, ..Default::default() }, &logits(), 2000);
        assert_eq!(distinct(&d), vec![1, 2]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p(2)/p(1) = e^-1 ≈ 0.37, p(0)/p(1) = e^-2 ≈ 0.14.
        let d = draw(SamplerConfig { min_p: 0.3, seed: 1, ..Default::default() }, &logits(), 2000);
        assert_eq!(distinct(&d), vec![1, 2]);
    }

    #[test]
    fn logit_bias_and_bans() {
        let cfg = SamplerConfig { logit_bias: vec![(4, 10.0)], ..SamplerConfig::greedy() };
        assert_eq!(draw(cfg, &logits(), 1), vec![4]);
        let cfg = SamplerConfig { logit_bias: vec![(1, f32::NEG_INFINITY)], ..SamplerConfig::greedy() };
        assert_eq!(draw(cfg, &logits(), 1), vec![2]);
        // Bias on an id beyond the vocabulary is ignored, not a crash.
        let cfg = SamplerConfig { logit_bias: vec![(99, 1.0)], ..SamplerConfig::greedy() };
        assert_eq!(draw(cfg, &logits(), 1), vec![1]);
    }

    #[test]
    fn all_masked_and_nan_are_errors() {
        let mut s = Sampler::new(SamplerConfig::default()).unwrap();
        assert!(s.sample(&[f32::NEG_INFINITY; 4]).is_err());
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
        let ban_all =
            SamplerConfig { logit_bias: (0..5).map(|t| (t, f32::NEG_INFINITY)).collect(), ..Default::default() };
        assert!(Sampler::new(ban_all).unwrap().sample(&logits()).is_err());
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut s = Sampler::new(SamplerConfig { presence_penalty: 1.5, ..SamplerConfig::greedy() }).unwrap();
        s.accept(1);
        // 3.0 - 1.5 = 1.5 < 2.0
        assert_eq!(s.sample(&logits()).unwrap(), 2);
        let mut s = Sampler::new(SamplerConfig { frequency_penalty: 0.4, ..SamplerConfig::greedy() }).unwrap();
        s.accept(1);
        s.accept(1);
        assert_eq!(s.sample(&logits()).unwrap(), 1); // 3.0 - 0.8 = 2.2 > 2.0
        s.accept(1);
        assert_eq!(s.sample(&logits()).unwrap(), 2); // 3.0 - 1.2 = 1.8 < 2.0
    }

    #[test]
    fn penalty_decay_forgets_old_tokens() {
        let cfg = SamplerConfig { frequency_penalty: 1.5, penalty_decay: 0.5, ..SamplerConfig::greedy() };
        let mut s = Sampler::new(cfg).unwrap();
        s.accept(1); // count(1) = 1: 3.0 - 1.5 < 2.0
        assert_eq!(s.sample(&logits()).unwrap(), 2);
        s.accept(3);
        s.accept(3); // count(1) decayed to 0.25: 3.0 - 0.375 > 2.0
        assert_eq!(s.sample(&logits()).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_scales_by_sign() {
        let cfg = SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::greedy() };
        let mut s = Sampler::new(cfg).unwrap();
        s.accept(1); // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&logits()).unwrap(), 2);
        let mut s = Sampler::new(SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::greedy() }).unwrap();
        s.accept(0);
        // A negative logit gets more negative: -1.0 * 2.
        assert_eq!(s.sample(&[-1.0, -1.5]).unwrap(), 1);
        s.reset();
        assert_eq!(s.sample(&[-1.0, -1.5]).unwrap(), 0);
    }

    #[test]
    fn bad_settings_are_errors() {
        for cfg in [
            SamplerConfig { temperature: -1.0, ..Default::default() },
            SamplerConfig { temperature: f32::NAN, ..Default::default() },
            SamplerConfig { top_p: 1.5, ..Default::default() },
            SamplerConfig { min_p: -0.1, ..Default::default() },
            SamplerConfig { repetition_penalty: 0.0, ..Default::default() },
            SamplerConfig { penalty_decay: 2.0, ..Default::default() },
            SamplerConfig { logit_bias: vec![(0, f32::NAN)], ..Default::default() },
        ] {
            assert!(Sampler::new(cfg.clone()).is_err(), "{cfg:?}");
        }
    }
}
