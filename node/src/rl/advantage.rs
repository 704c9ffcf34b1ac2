//! The pure arithmetic of an RL step, as tinker-cookbook does it: group-centred
//! advantages, dropping constant-reward groups, and the KL penalty against the base model
//! shaped into the per-token advantages. No model, no I/O: tested against hand-computed
//! values.

/// `reward − mean(group)` for every sample; samples are laid out group after group, each
/// `group_size` long (tinker-cookbook's `compute_advantages`).
pub fn group_advantages(rewards: &[f64], group_size: usize) -> Vec<f64> {
    assert!(group_size > 0, "group_size must be positive");
    rewards
        .chunks(group_size)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            g.iter().map(move |r| r - mean)
        })
        .collect()
}

/// Indices of the groups whose rewards are not all equal.
pub fn non_constant_groups(rewards: &[f64], group_size: usize) -> Vec<usize> {
    rewards
        .chunks(group_size)
        .enumerate()
        .filter(|(_, g)| g.iter().any(|&r| r != g[0]))
        .map(|(i, _)| i)
        .collect()
}

/// Indices of the groups to train on: those whose rewards are not all equal. When every
/// group is constant the first is kept, as tinker-cookbook's
/// `remove_constant_reward_groups` does, so a step always has a batch (its advantages are
/// zero, so only the KL penalty, if any, moves the policy).
pub fn kept_groups(rewards: &[f64], group_size: usize) -> Vec<usize> {
    let kept = non_constant_groups(rewards, group_size);
    if kept.is_empty() && !rewards.is_empty() {
        vec![0]
    } else {
        kept
    }
}

/// tinker-cookbook's `incorporate_kl_penalty` on the completion tokens of each datum:
/// with `d = sampler logprob − base logprob` per token and `d̄` its mean over every token
/// of the batch, each token's advantage gets `coef · (d̄ − d)`. Returns `d̄`, the sampled
/// estimate of KL(policy ‖ base). Rows of the three arguments must have equal lengths.
pub fn apply_kl_penalty(
    advantages: &mut [Vec<f32>],
    sampler_logprobs: &[Vec<f32>],
    base_logprobs: &[Vec<f32>],
    coef: f64,
) -> f64 {
    let diffs: Vec<Vec<f64>> = sampler_logprobs
        .iter()
        .zip(base_logprobs)
        .map(|(s, b)| {
            assert_eq!(s.len(), b.len(), "sampler and base logprob rows differ");
            s.iter()
                .zip(b)
                .map(|(&s, &b)| s as f64 - b as f64)
                .collect()
        })
        .collect();
    let n: usize = diffs.iter().map(Vec::len).sum();
    if n == 0 {
        return 0.0;
    }
    let mean = diffs.iter().flatten().sum::<f64>() / n as f64;
    for (adv, d) in advantages.iter_mut().zip(&diffs) {
        assert_eq!(adv.len(), d.len(), "advantage and logprob rows differ");
        for (a, &d) in adv.iter_mut().zip(d) {
            *a = (*a as f64 + coef * (mean - d)) as f32;
        }
    }
    mean
}

/// Σ (sampler logprob − base logprob) over every completion token, and the token count:
/// a distributed run sums these over the ranks to get the step's mean `d̄`.
pub fn kl_diff_sum(sampler_logprobs: &[Vec<f32>], base_logprobs: &[Vec<f32>]) -> (f64, usize) {
    let mut sum = 0.0;
    let mut n = 0;
    for (s, b) in sampler_logprobs.iter().zip(base_logprobs) {
        assert_eq!(s.len(), b.len(), "sampler and base logprob rows differ");
        for (&s, &b) in s.iter().zip(b) {
            sum += s as f64 - b as f64;
            n += 1;
        }
    }
    (sum, n)
}

/// [`apply_kl_penalty`] with the batch mean `mean` given (the whole step's, in a
/// distributed run): each token's advantage gets `coef · (mean − d)`.
pub fn apply_kl_penalty_with_mean(
    advantages: &mut [Vec<f32>],
    sampler_logprobs: &[Vec<f32>],
    base_logprobs: &[Vec<f32>],
    coef: f64,
    mean: f64,
) {
    for ((adv, s), b) in advantages
        .iter_mut()
        .zip(sampler_logprobs)
        .zip(base_logprobs)
    {
        assert_eq!(adv.len(), s.len(), "advantage and logprob rows differ");
        for ((a, &s), &b) in adv.iter_mut().zip(s).zip(b) {
            let d = s as f64 - b as f64;
            *a = (*a as f64 + coef * (mean - d)) as f32;
        }
    }
}

/// Mean over `xs` (0 when empty).
pub fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = xs
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_centred_per_group() {
        // Groups of 3: mean 1/3 and mean 2.
        let a = group_advantages(&[1.0, 0.0, 0.0, 2.0, 2.0, 2.0], 3);
        let want = [2.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0, 0.0];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        assert_eq!(group_advantages(&[-0.1, 1.0], 2), vec![-0.55, 0.55]);
    }

    #[test]
    fn constant_groups_are_dropped_but_one_is_kept() {
        let r = [1.0, 1.0, 0.0, 1.0, -0.1, -0.1, 0.5, 0.0];
        assert_eq!(kept_groups(&r, 2), vec![1, 3]);
        assert_eq!(kept_groups(&[0.0, 0.0, 0.0, 0.0], 2), vec![0]);
        assert_eq!(kept_groups(&[], 2), Vec::<usize>::new());
    }

    #[test]
    fn kl_penalty_shapes_advantages_around_the_mean() {
        // d = s − b: row 0 [0.5, -0.5 + ...]: d = [1.0, 0.0], row 1: d = [2.0]; mean 1.0.
        let s = vec![vec![-1.0f32, -2.0], vec![-0.5]];
        let b = vec![vec![-2.0f32, -2.0], vec![-2.5]];
        let mut adv = vec![vec![0.5f32, 0.5], vec![-1.0]];
        let kl = apply_kl_penalty(&mut adv, &s, &b, 0.1);
        assert!((kl - 1.0).abs() < 1e-12);
        // a + 0.1·(1 − d): [0.5 + 0, 0.5 + 0.1], [-1 − 0.1].
        let want = [vec![0.5f32, 0.6], vec![-1.1]];
        for (r, w) in adv.iter().zip(&want) {
            for (x, y) in r.iter().zip(w) {
                assert!((x - y).abs() < 1e-6, "{adv:?}");
            }
        }
        // Coefficient 0 leaves advantages alone but still measures the KL.
        let mut adv2 = vec![vec![0.5f32, 0.5], vec![-1.0]];
        assert_eq!(apply_kl_penalty(&mut adv2, &s, &b, 0.0), kl);
        assert_eq!(adv2, vec![vec![0.5f32, 0.5], vec![-1.0]]);
    }
}
