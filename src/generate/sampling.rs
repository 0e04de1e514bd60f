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

/// Index of the largest value (the first one on ties); NaN never wins, and all-NaN gives 0.
///
/// Two passes in lanes of [`LANES`] values: the largest value, then the first lane group that
/// holds it: 0.06 ms over the 248,320 logits of a 0.8B decode step, where a compare and branch per
/// value took 0.22 ms (0.6 % of an int8 step; benches/RESULTS.md, "The pool's cost").
pub fn argmax(x: &[f32]) -> u32 {
    let (groups, tail) = x.as_chunks::<LANES>();
    let mut top = [f32::NEG_INFINITY; LANES];
    for g in groups {
        for l in 0..LANES {
            // `>` is false for NaN, which so never wins: one vector max instruction on x86.
            top[l] = if g[l] > top[l] { g[l] } else { top[l] };
        }
    }
    let best = top.iter().chain(tail).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let group = groups.iter().position(|g| g.iter().fold(false, |hit, &v| hit | (v == best)));
    let start = group.map_or(groups.len() * LANES, |g| g * LANES);
    // All NaN: nothing equals the −∞ that `best` stayed at.
    x[start..].iter().position(|&v| v == best).map_or(0, |i| (start + i) as u32)
}

/// Values [`argmax`] compares at once: a whole number of vector registers.
const LANES: usize = 16;

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

    #[test]
    fn argmax_takes_the_first_of_the_largest_and_skips_nan() {
        // Against the plain loop, with the winner in the lane groups, in the tail, and tied.
        let plain = |x: &[f32]| {
            let mut best = None;
            for (i, &v) in x.iter().enumerate() {
                if !v.is_nan() && best.is_none_or(|b: usize| v > x[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut x: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 5.0).collect();
        for at in [0, 15, 16, 500, 991, 999] {
            let mut y = x.clone();
            y[at] = 100.0;
            assert_eq!(argmax(&y), at as u32);
            assert_eq!(argmax(&y), plain(&y));
            // A tie later on keeps the first.
            y[999 - at / 2] = 100.0;
            assert_eq!(argmax(&y), plain(&y));
        }
        x[3] = f32::NAN;
        x[0] = f32::NAN;
        assert_eq!(argmax(&x), plain(&x));
        assert_eq!(argmax(&[f32::NAN; 20]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[1.0, f32::INFINITY, 2.0]), 1);
        // Few distinct values (many ties), NaN and −∞ sprinkled in, lengths with and without a tail.
        let mut seed = 1u64;
        for len in [1usize, 7, 16, 17, 48, 100, 333] {
            for _ in 0..50 {
                let y: Vec<f32> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        match seed >> 60 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            r => r as f32,
                        }
                    })
                    .collect();
                assert_eq!(argmax(&y), plain(&y), "{y:?}");
            }
        }
    }
}
