//! Comparing next-token distributions: log-softmax, KL divergence, top-1.

/// Natural-log softmax of `logits` (computed in f64, stored as f32).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// KL(p || q) in nats from two log-probability vectors of the same length:
/// `Σ p · (log p − log q)` over tokens with `p > 0`.
///
/// # Panics
/// When the lengths differ.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f64 {
    assert_eq!(log_p.len(), log_q.len(), "distributions over different vocabularies");
    log_p
        .iter()
        .zip(log_q)
        .filter(|(&lp, _)| lp > f32::NEG_INFINITY)
        .map(|(&lp, &lq)| {
            let p = (lp as f64).exp();
            p * (lp as f64 - lq as f64)
        })
        .sum::<f64>()
        .max(0.0)
}

/// Index of the largest value (the first one on ties); 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// KL divergence at each compared position and top-1 agreement against a
/// reference.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agreement {
    /// KL divergence (nats) at each compared position, in order.
    pub kl: Vec<f64>,
    /// Positions whose top-1 token matched the reference's.
    pub top1_same: usize,
}

impl Agreement {
    /// Adds one position: reference and candidate log-probabilities.
    pub fn add(&mut self, reference: &[f32], candidate: &[f32]) {
        self.kl.push(kl_divergence(reference, candidate));
        self.top1_same += usize::from(argmax(reference) == argmax(candidate));
    }

    /// Compared positions.
    pub fn n(&self) -> usize {
        self.kl.len()
    }

    /// Mean KL divergence in nats per token (0 when empty).
    pub fn mean_kl(&self) -> f64 {
        if self.kl.is_empty() {
            0.0
        } else {
            self.kl.iter().sum::<f64>() / self.kl.len() as f64
        }
    }

    /// Largest KL divergence at one position (0 when empty).
    pub fn max_kl(&self) -> f64 {
        self.kl.iter().copied().fold(0.0, f64::max)
    }

    /// Fraction of positions with the same top-1 token (0 when empty).
    pub fn top1(&self) -> f64 {
        if self.kl.is_empty() {
            0.0
        } else {
            self.top1_same as f64 / self.kl.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, -1e30]);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let p = log_softmax(&[0.5, 1.5, -2.0]);
        let q = log_softmax(&[1.5, 0.5, -2.0]);
        assert_eq!(kl_divergence(&p, &p), 0.0);
        let kl = kl_divergence(&p, &q);
        // Hand computation.
        let pe: Vec<f64> = p.iter().map(|&x| (x as f64).exp()).collect();
        let expected: f64 = (0..3).map(|i| pe[i] * (p[i] as f64 - q[i] as f64)).sum();
        assert!((kl - expected).abs() < 1e-9 && kl > 0.0);
    }

    #[test]
    fn agreement_accumulates() {
        let a = log_softmax(&[0.0, 3.0]);
        let b = log_softmax(&[3.0, 0.0]);
        let mut acc = Agreement::default();
        acc.add(&a, &a);
        acc.add(&a, &b);
        assert_eq!(acc.n(), 2);
        assert_eq!(acc.kl[0], 0.0);
        assert_eq!(acc.top1(), 0.5);
        assert!(acc.mean_kl() > 0.0 && acc.max_kl() == acc.kl[1]);
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }
}
