//! The key/value cache for incremental decoding: per decoder layer a preallocated
//! `[B, kv_heads, capacity, head_dim]` pair of tensors that new positions are written into
//! in place (no re-copy of the past per step), plus the per-row bookkeeping that lets rows
//! of different lengths share one cache.
//!
//! Rows are *left-aligned to a shared slot clock*: every row writes its n-th new token into
//! the same slot, and row `b` simply ignores the slots before its own `start[b]` (left
//! padding). A key at slot `j` of row `b` is at position `j − start[b]` for RoPE, and is
//! visible to a query only if `start[b] ≤ j ≤ query slot` (and inside a sliding window).
//! Masked keys get probability exactly 0, so padding never changes a real row's numbers.
//!
//! Deliberately not here: the decoder itself (see [`crate::model`]) and sampling policy
//! (see [`crate::sample`]).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The cache of one model for one batch of rows.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `[B, kv_heads, capacity, head_dim]`, contiguous.
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    /// Per row, the first slot that holds a real token.
    pub(crate) start: Vec<usize>,
    /// Slots filled so far (the same for every row).
    pub(crate) len: usize,
    /// Slots allocated.
    pub(crate) capacity: usize,
}

impl KvCache {
    /// An empty cache for `start.len()` rows whose real tokens begin at slot `start[b]`,
    /// with room for `capacity` slots.
    pub(crate) fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        start: Vec<usize>,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let b = start.len();
        let mut l = Vec::with_capacity(layers);
        for _ in 0..layers {
            let shape = (b, kv_heads, capacity, head_dim);
            l.push((
                Tensor::zeros(shape, dtype, device)?,
                Tensor::zeros(shape, dtype, device)?,
            ));
        }
        Ok(KvCache {
            layers: l,
            start,
            len: 0,
            capacity,
        })
    }

    /// Rows in the cache.
    pub fn rows(&self) -> usize {
        self.start.len()
    }

    /// Slots filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes room for `t` more slots of `rows` rows: the capacity at least doubles when it
    /// runs out (amortised O(1) copies per slot), so a caller may start small.
    pub(crate) fn ensure_room(&mut self, rows: usize, t: usize) -> Result<()> {
        if rows != self.rows() {
            return Err(Error::InvalidBatch(format!(
                "kv cache holds {} rows, got {rows}",
                self.rows()
            )));
        }
        let need = self.len + t;
        if need <= self.capacity {
            return Ok(());
        }
        let cap = need.max(self.capacity * 2);
        for (k, v) in &mut self.layers {
            for x in [k, v] {
                let (b, h, _, d) = x.dims4()?;
                let grown = Tensor::zeros((b, h, cap, d), x.dtype(), x.device())?;
                if self.len > 0 {
                    grown.slice_set(&x.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                *x = grown;
            }
        }
        self.capacity = cap;
        Ok(())
    }

    /// RoPE positions of the next `t` slots, row-major `[B·t]` (a padding slot gets 0; it
    /// is never attended).
    pub(crate) fn positions(&self, t: usize) -> Vec<usize> {
        let mut p = Vec::with_capacity(self.rows() * t);
        for &s in &self.start {
            for i in self.len..self.len + t {
                p.push(i.saturating_sub(s));
            }
        }
        p
    }

    /// Keeps only the rows in `keep` (in that order), e.g. when other rows have finished.
    pub(crate) fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if keep.len() == self.rows() && keep.iter().enumerate().all(|(i, &k)| i == k) {
            return Ok(());
        }
        let device = self
            .layers
            .first()
            .map(|(k, _)| k.device().clone())
            .unwrap_or(Device::Cpu);
        let idx = Tensor::from_vec(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            keep.len(),
            &device,
        )?;
        for (k, v) in &mut self.layers {
            *k = k.index_select(&idx, 0)?.contiguous()?;
            *v = v.index_select(&idx, 0)?.contiguous()?;
        }
        self.start = keep.iter().map(|&i| self.start[i]).collect();
        Ok(())
    }
}

/// The additive mask `[B, 1, t, len + t]` (0 or −∞) for the next `t` query slots of rows
/// whose real tokens start at `start[b]`, after `len` filled slots. A padding query sees
/// only itself, so its softmax stays finite (its output is never used: no real query
/// attends a padding key).
pub(crate) fn mask(
    start: &[usize],
    len: usize,
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let s = len + t;
    let mut m = vec![f32::NEG_INFINITY; start.len() * t * s];
    for (b, &st) in start.iter().enumerate() {
        for qi in 0..t {
            let i = len + qi;
            let row = &mut m[(b * t + qi) * s..(b * t + qi + 1) * s];
            if i < st {
                row[i] = 0.0;
                continue;
            }
            let lo = window.map_or(st, |w| st.max((i + 1).saturating_sub(w)));
            row[lo..=i].fill(0.0);
        }
    }
    Ok(Tensor::from_vec(m, (start.len(), 1, t, s), device)?)
}

/// RoPE tables `[n, d/2]` for arbitrary positions, computed exactly as
/// `LoraModel::rope_tables` does for positions `0..t` (so the numbers match).
pub(crate) fn rope_tables_at(
    inv_freq: &[f32],
    positions: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (positions.len(), half), device)?,
        Tensor::from_vec(sin, (positions.len(), half), device)?,
    ))
}
