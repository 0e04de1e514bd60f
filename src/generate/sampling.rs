//! Choosing the next token: greedy, or seeded sampling with temperature, top-k and top-p.

use rand::{RngExt, SeedableRng, rngs::StdRng};

use crate::llm::Sampling;

/// Seeded token sampler.
pub struct Sampler {
    cfg: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `cfg`, seeded with `cfg.seed`.
    pub fn new(cfg: Sampling) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    /// Picks a token from `logits` (only the first `vocab_limit` entries are real tokens).
    pub fn pick(&mut self, logits: &[f32], vocab_limit: usize) -> u32 {
        let logits = &logits[..vocab_limit.min(logits.len())];
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / self.cfg.temperature)).collect();
        // Order by logit (ties by id) only as far as the filters need: a full sort of 248K
        // candidates per token would cost a good part of a decode step.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.cfg.top_k > 0 && self.cfg.top_k < cand.len() {
            cand.select_nth_unstable_by(self.cfg.top_k - 1, order);
            cand.truncate(self.cfg.top_k);
        }
        if self.cfg.top_p < 1.0 || self.cfg.top_k > 0 {
            cand.sort_unstable_by(order);
        }
        let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let mut probs: Vec<f32> = cand.iter().map(|&(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|&p| {
                acc += p;
                acc >= self.cfg.top_p
            });
            let keep = keep.map(|k| k + 1).unwrap_or(probs.len());
            probs.truncate(keep);
            cand.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r: f32 = self.rng.random_range(0.0..1.0);
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut g = Sampler::new(Sampling::default());
        assert_eq!(g.pick(&logits, 4), 1);
        let cfg = Sampling { temperature: 1.0, top_k: 3, top_p: 0.95, seed: 42 };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..32).map(|_| s.pick(&logits, 4)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..32).map(|_| s.pick(&logits, 4)).collect()
        };
        assert_eq!(a, b);
        // top_k = 3 never yields the least likely token.
        assert!(a.iter().all(|&t| t != 3));
        // Temperature only (no top-k/top-p): follows the distribution without sorting it.
        let mut s = Sampler::new(Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 });
        let picks: Vec<u32> = (0..2000).map(|_| s.pick(&[0.0, 3.0, 0.0, -5.0], 4)).collect();
        let share = picks.iter().filter(|&&t| t == 1).count() as f64 / picks.len() as f64;
        // softmax([0, 3, 0, -5])[1] = 0.909
        assert!((share - 0.909).abs() < 0.03, "token 1 drawn {share}");
        // vocab_limit masks padded vocabulary entries.
        assert_eq!(g.pick(&[0.0, 1.0, 9.0], 2), 1);
    }
}
