//! Sampling from base + adapter (or the base alone) with a kv cache: batched prompts of
//! different lengths, temperature / top-k / top-p, stop token ids, a caller's stop hook,
//! `max_tokens`, per-token logprobs, and tinker's `compute_logprobs` (prompt logprobs).
//!
//! Prompts are left-padded onto one slot clock (see [`crate::kv_cache`]); the padding is
//! masked with probability exactly 0, so a row's numbers do not depend on the other rows.
//! Rows that finish are dropped from the cache, so the batch shrinks as it goes.
//!
//! Randomness: each row draws from its own SplitMix64 stream seeded by `(seed, row index)`
//! — not from a shared generator — so a row's draws do not depend on how many other rows
//! there are, how fast they finish, or the thread count; and repeated prompts in one batch
//! (a group of G samples for RL) still get different samples.
//!
//! Logprobs: the logprob of each sampled token is taken under the distribution it was
//! actually drawn from — softmax(logits / temperature), restricted to the top-k / top-p
//! set and renormalised — which is what an importance-sampling or PPO loss needs as the
//! behaviour policy. With temperature 1 and no top-k/top-p that is exactly the model's
//! logprob. Greedy decoding (temperature 0) reports the model's logprob at temperature 1
//! (the point mass it "samples" from would always give 0).
//!
//! Deliberately not here: stop *strings* (they need the tokenizer, which this crate does
//! not know; callers implement them with the stop hook), chat rendering, and I/O.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::lora::Adapters;
use crate::model::LoraModel;

/// How to sample (tinker's `SamplingParams`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// The most tokens to generate per row (the stop token, if hit, counts).
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability
    /// reaches `top_p` (1.0: all). Applied after top-k.
    pub top_p: f32,
    /// Token ids that end a row; the stop token is included in the sample (as tinker does).
    pub stop_token_ids: Vec<u32>,
    /// Seed of every row's random stream: row `i` of a call uses `(seed, i)` (see
    /// [`LoraModel::sample_rows`] for batches split across calls).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 64,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            stop_token_ids: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::InvalidBatch(format!(
                "sampling params: temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::InvalidBatch(
                "sampling params: top_k must be >= 1 (or unset for no limit)".into(),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidBatch(format!(
                "sampling params: top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// It sampled one of `stop_token_ids` (the last token of the sample).
    StopToken,
    /// The caller's stop hook returned true (e.g. a stop string appeared).
    StopHook,
    /// It reached `max_tokens`.
    MaxTokens,
}

impl StopReason {
    /// `stop_token`, `stop_hook` or `max_tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::StopToken => "stop_token",
            StopReason::StopHook => "stop_hook",
            StopReason::MaxTokens => "max_tokens",
        }
    }

    /// tinker's two-valued reason: `stop` (a stop condition) or `length` (max_tokens).
    pub fn tinker(self) -> &'static str {
        match self {
            StopReason::StopToken | StopReason::StopHook => "stop",
            StopReason::MaxTokens => "length",
        }
    }
}

/// One sampled completion (tinker's `SampledSequence`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The generated tokens (not the prompt), the stop token included.
    pub tokens: Vec<u32>,
    /// Per generated token, its logprob under the distribution it was drawn from.
    pub logprobs: Vec<f32>,
    /// Why the row stopped.
    pub stop_reason: StopReason,
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and fully specified, so streams are
/// the same on every platform and version.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The stream of row `row` under `seed`.
    fn for_row(seed: u64, row: usize) -> Self {
        let mut s = SplitMix64(seed);
        let a = s.next_u64();
        let mut r = SplitMix64(row as u64 ^ 0x5851_f42d_4c95_7f2d);
        SplitMix64(a ^ r.next_u64())
    }
}

/// Draws one token from a row of logits; returns `(token, logprob)`.
fn draw(logits: &[f32], params: &SamplingParams, rng: &mut SplitMix64) -> (u32, f32) {
    if params.temperature == 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        let m = logits[best];
        let z: f64 = logits.iter().map(|&v| ((v - m) as f64).exp()).sum();
        return (best as u32, -(z.ln()) as f32);
    }
    let inv_t = 1.0 / params.temperature as f64;
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    // Unnormalised probabilities of the tempered distribution.
    let w = |i: usize| ((logits[i] as f64 - m) * inv_t).exp();
    let v = logits.len();
    let k = params.top_k.unwrap_or(v).min(v);
    let truncated = k < v || params.top_p < 1.0;
    let candidates: Vec<usize> = if truncated {
        // Most likely first, ties to the lower id, so the kept set is deterministic.
        let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let mut idx: Vec<usize> = (0..v).collect();
        if k < v {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_unstable_by(cmp);
        if params.top_p < 1.0 {
            let ws: Vec<f64> = idx.iter().map(|&i| w(i)).collect();
            let total: f64 = ws.iter().sum();
            let mut cum = 0.0;
            let mut keep = idx.len();
            for (n, x) in ws.iter().enumerate() {
                cum += x / total;
                if cum >= params.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            idx.truncate(keep);
        }
        idx
    } else {
        Vec::new()
    };
    let (tok, wt, z) = if truncated {
        let ws: Vec<f64> = candidates.iter().map(|&i| w(i)).collect();
        let z: f64 = ws.iter().sum();
        let u = rng.next_f64() * z;
        let mut cum = 0.0;
        let mut pick = candidates.len() - 1;
        for (n, x) in ws.iter().enumerate() {
            cum += x;
            if u < cum {
                pick = n;
                break;
            }
        }
        (candidates[pick], ws[pick], z)
    } else {
        let ws: Vec<f64> = (0..v).map(w).collect();
        let z: f64 = ws.iter().sum();
        let u = rng.next_f64() * z;
        let mut cum = 0.0;
        // Fallback for rounding at the very top: the last token with nonzero weight.
        let mut pick = ws.iter().rposition(|&x| x > 0.0).unwrap_or(v - 1);
        for (n, x) in ws.iter().enumerate() {
            cum += x;
            if u < cum {
                pick = n;
                break;
            }
        }
        (pick, ws[pick], z)
    };
    (tok as u32, (wt / z).ln() as f32)
}

/// `ln softmax(logits)[target]`, in f64.
fn log_softmax_at(logits: &[f32], target: usize) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
    (logits[target] as f64 - m - z.ln()) as f32
}

impl LoraModel {
    fn check_prompt(&self, what: &str, i: usize, p: &[u32]) -> Result<()> {
        if p.is_empty() {
            return Err(Error::InvalidBatch(format!("{what} {i} is empty")));
        }
        let v = self.config().vocab_size;
        if let Some((pos, t)) = p.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return Err(Error::InvalidBatch(format!(
                "{what} {i}, position {pos}: token id {t} is outside the vocabulary (size {v})"
            )));
        }
        Ok(())
    }

    /// Samples one completion per prompt (repeat a prompt for several samples of it).
    ///
    /// `stop(row, tokens)` is called after every generated token with the row's index in
    /// `prompts` and its completion so far; returning true ends that row
    /// ([`StopReason::StopHook`]) — how callers implement stop strings. Stop token ids are
    /// checked first, then the hook, then `max_tokens`.
    pub fn sample(
        &self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        adapters: Adapters,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Result<Vec<Sample>> {
        self.sample_rows(prompts, 0, params, adapters, stop)
    }

    /// [`LoraModel::sample`] for rows `first_row..first_row + prompts.len()` of a larger
    /// batch: row `i` here draws from stream `(seed, first_row + i)`, so a batch split
    /// across calls (or nodes) samples exactly what one call would. The hook still gets
    /// indices into `prompts`.
    pub fn sample_rows(
        &self,
        prompts: &[Vec<u32>],
        first_row: usize,
        params: &SamplingParams,
        adapters: Adapters,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Result<Vec<Sample>> {
        params.validate()?;
        for (i, p) in prompts.iter().enumerate() {
            self.check_prompt("prompt", i, p)?;
        }
        let mut out: Vec<Sample> = prompts
            .iter()
            .map(|_| Sample {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                stop_reason: StopReason::MaxTokens,
            })
            .collect();
        if prompts.is_empty() || params.max_tokens == 0 {
            return Ok(out);
        }
        let vocab = self.config().vocab_size;
        let lmax = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let start: Vec<usize> = prompts.iter().map(|p| lmax - p.len()).collect();
        let mut ids = Vec::with_capacity(prompts.len() * lmax);
        for (p, &s) in prompts.iter().zip(&start) {
            ids.extend(std::iter::repeat_n(0u32, s));
            ids.extend_from_slice(p);
        }
        // The last generated token is never fed back, hence − 1. A huge max_tokens does not
        // preallocate: the cache starts with room for 256 new slots and grows by doubling.
        let mut cache = self.new_kv_cache(start, lmax + (params.max_tokens - 1).min(256))?;
        let ids = Tensor::from_vec(ids, (prompts.len(), lmax), self.device())?;
        let mut logits = self.cached_logits(&ids, &mut cache, adapters)?;
        let mut rngs: Vec<SplitMix64> = (0..prompts.len())
            .map(|i| SplitMix64::for_row(params.seed, first_row + i))
            .collect();
        // Original row index of each cache row.
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        let prof = std::env::var_os("RINGTUNE_PROFILE").is_some();
        let (mut t_draw, mut t_fwd) = (0f64, 0f64);
        loop {
            let td = std::time::Instant::now();
            let mut keep = Vec::with_capacity(active.len());
            let mut next = Vec::with_capacity(active.len());
            // Rows draw in parallel (each from its own stream, so the result is the same);
            // the stop checks and the caller's hook then run in row order on this thread.
            let draws: Vec<((u32, f32), SplitMix64)> = active
                .par_iter()
                .enumerate()
                .map(|(ci, &row)| {
                    let mut rng = rngs[row].clone();
                    let d = draw(&logits[ci * vocab..(ci + 1) * vocab], params, &mut rng);
                    (d, rng)
                })
                .collect();
            for ((ci, &row), ((tok, lp), rng)) in active.iter().enumerate().zip(draws) {
                rngs[row] = rng;
                let s = &mut out[row];
                s.tokens.push(tok);
                s.logprobs.push(lp);
                let reason = if params.stop_token_ids.contains(&tok) {
                    Some(StopReason::StopToken)
                } else if stop(row, &s.tokens) {
                    Some(StopReason::StopHook)
                } else if s.tokens.len() >= params.max_tokens {
                    Some(StopReason::MaxTokens)
                } else {
                    None
                };
                match reason {
                    Some(r) => s.stop_reason = r,
                    None => {
                        keep.push(ci);
                        next.push(tok);
                    }
                }
            }
            t_draw += td.elapsed().as_secs_f64();
            if keep.is_empty() {
                break;
            }
            let tf = std::time::Instant::now();
            cache.retain(&keep)?;
            active = keep.iter().map(|&ci| active[ci]).collect();
            let ids = Tensor::from_vec(next, (active.len(), 1), self.device())?;
            logits = self.cached_logits(&ids, &mut cache, adapters)?;
            t_fwd += tf.elapsed().as_secs_f64();
        }
        if prof {
            eprintln!("profile: sample draw {t_draw:.3}s decode forward {t_fwd:.3}s");
        }
        Ok(out)
    }

    /// Last-slot logits of every cache row, flattened `[B·vocab]` f32.
    fn cached_logits(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        adapters: Adapters,
    ) -> Result<Vec<f32>> {
        let l = self.forward_cached(ids, cache, adapters, true)?;
        Ok(l.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// tinker's `compute_logprobs`: for each sequence, the logprob of every token given
    /// the tokens before it — `None` for the first (it has no prefix). Sequences run one at
    /// a time through the kv cache in chunks, so no more than a chunk of full-vocabulary
    /// logits exists at once.
    pub fn prompt_logprobs(
        &self,
        sequences: &[Vec<u32>],
        adapters: Adapters,
    ) -> Result<Vec<Vec<Option<f32>>>> {
        const CHUNK: usize = 128;
        let vocab = self.config().vocab_size;
        let mut out = Vec::with_capacity(sequences.len());
        for (i, seq) in sequences.iter().enumerate() {
            self.check_prompt("sequence", i, seq)?;
            let mut lps = Vec::with_capacity(seq.len());
            lps.push(None);
            let mut cache = self.new_kv_cache(vec![0], seq.len())?;
            for (c, chunk) in seq.chunks(CHUNK).enumerate() {
                let ids = Tensor::from_vec(chunk.to_vec(), (1, chunk.len()), self.device())?;
                let l = self
                    .forward_cached(&ids, &mut cache, adapters, false)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for (j, row) in l.chunks_exact(vocab).enumerate() {
                    let pos = c * CHUNK + j;
                    if let Some(&next) = seq.get(pos + 1) {
                        lps.push(Some(log_softmax_at(row, next as usize)));
                    }
                }
            }
            out.push(lps);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: Option<usize>, p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_report_its_logprob() {
        let logits = [0.0f32, (2f32).ln(), (5f32).ln(), f32::NEG_INFINITY];
        let mut rng = SplitMix64::for_row(7, 0);
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            let (t, lp) = draw(&logits, &params(1.0, None, 1.0), &mut rng);
            counts[t as usize] += 1;
            let want = [1.0f64 / 8.0, 2.0 / 8.0, 5.0 / 8.0][t as usize].ln();
            assert!((lp as f64 - want).abs() < 1e-6, "token {t}: {lp} vs {want}");
        }
        assert_eq!(counts[3], 0, "a -inf logit was sampled");
        for (c, p) in counts.iter().zip([1.0 / 8.0, 2.0 / 8.0, 5.0 / 8.0]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.015, "frequency {f} vs {p}");
        }
    }

    #[test]
    fn top_k_and_top_p_truncate_and_renormalise() {
        let logits = [0.0f32, (2f32).ln(), (5f32).ln(), (2f32).ln()];
        let mut rng = SplitMix64::for_row(1, 3);
        // top_k 1 → always the argmax, logprob 0.
        for _ in 0..50 {
            assert_eq!(
                draw(&logits, &params(1.0, Some(1), 1.0), &mut rng),
                (2, 0.0)
            );
        }
        // top_p 0.7: {2 (0.5)} is not enough, {2, 1} (0.7) is (ties to the lower id).
        for _ in 0..200 {
            let (t, lp) = draw(&logits, &params(1.0, None, 0.7), &mut rng);
            assert!(t == 2 || t == 1, "token {t} outside the nucleus");
            let want = if t == 2 { 5.0f64 / 7.0 } else { 2.0 / 7.0 }.ln();
            assert!((lp as f64 - want).abs() < 1e-6);
        }
        // Temperature 0.5 squares the odds: p ∝ 1, 4, 25, 4.
        let (t, lp) = loop {
            let d = draw(&logits, &params(0.5, None, 1.0), &mut rng);
            if d.0 == 0 {
                break d;
            }
        };
        assert_eq!(t, 0);
        assert!((lp as f64 - (1.0f64 / 34.0).ln()).abs() < 1e-6);
        // Greedy: argmax, the model's logprob.
        let (t, lp) = draw(&logits, &params(0.0, None, 1.0), &mut rng);
        assert_eq!(t, 2);
        assert!((lp as f64 - (5.0f64 / 10.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn row_streams_differ_and_repeat() {
        let a: Vec<u64> = {
            let mut r = SplitMix64::for_row(5, 0);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = SplitMix64::for_row(5, 1);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = SplitMix64::for_row(5, 0);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_ne!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn bad_params_name_the_field() {
        for (p, field) in [
            (params(-1.0, None, 1.0), "temperature"),
            (params(f32::NAN, None, 1.0), "temperature"),
            (params(1.0, Some(0), 1.0), "top_k"),
            (params(1.0, None, 0.0), "top_p"),
            (params(1.0, None, 1.5), "top_p"),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
