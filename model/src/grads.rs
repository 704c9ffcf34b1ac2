//! Named adapter tensors in one fixed order, and their flat f32 form.
//!
//! The distributed runtime all-reduces ONE flat f32 buffer, and every rank must lay it out
//! the same way, so the order is fixed: sorted by PEFT key. [`ParamLayout`] is that order
//! with the shapes; [`Gradients`] (and the optimizer state) follow it.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The adapter parameters' keys (sorted) and shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    entries: Vec<(String, Vec<usize>)>,
}

impl ParamLayout {
    /// Builds a layout; entries are sorted by key, duplicate keys are an error.
    pub fn new(mut entries: Vec<(String, Vec<usize>)>) -> Result<Self> {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::ParamMismatch(format!(
                "duplicate parameter key `{}`",
                w[0].0
            )));
        }
        Ok(ParamLayout { entries })
    }

    /// `(key, shape)` in order.
    pub fn entries(&self) -> &[(String, Vec<usize>)] {
        &self.entries
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No tensors at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalars (length of the flat buffer).
    pub fn numel(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Position of a key.
    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
    }

    /// Splits a flat buffer into named tensors following this layout. Off the CPU the
    /// buffer goes to the device in one transfer and each tensor is a view of it (one
    /// transfer per tensor would be one device sync each).
    pub fn unflatten(&self, flat: &[f32], device: &Device) -> Result<Vec<(String, Tensor)>> {
        if flat.len() != self.numel() {
            return Err(Error::ParamMismatch(format!(
                "flat buffer has {} values, the layout needs {}",
                flat.len(),
                self.numel()
            )));
        }
        let mut off = 0;
        let mut out = Vec::with_capacity(self.entries.len());
        if !device.is_cpu() && !self.entries.is_empty() {
            let all = Tensor::from_slice(flat, flat.len(), device)?;
            for (k, shape) in &self.entries {
                let n: usize = shape.iter().product();
                out.push((k.clone(), all.narrow(0, off, n)?.reshape(shape.as_slice())?));
                off += n;
            }
            return Ok(out);
        }
        for (k, shape) in &self.entries {
            let n: usize = shape.iter().product();
            out.push((
                k.clone(),
                Tensor::from_slice(&flat[off..off + n], shape.as_slice(), device)?,
            ));
            off += n;
        }
        Ok(out)
    }

    /// Concatenates named tensors (which must match this layout key by key and shape by
    /// shape) into one flat f32 buffer. Tensors off the CPU are concatenated there and
    /// read back in one transfer.
    pub fn flatten(&self, tensors: &[(String, Tensor)]) -> Result<Vec<f32>> {
        self.check(tensors)?;
        if let Some((_, t0)) = tensors.first() {
            let dev = t0.device();
            if !dev.is_cpu() && tensors.iter().all(|(_, t)| t.device().same_device(dev)) {
                let parts = tensors
                    .iter()
                    .map(|(_, t)| t.to_dtype(DType::F32)?.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                return Ok(Tensor::cat(&parts, 0)?.to_vec1::<f32>()?);
            }
        }
        let mut flat = Vec::with_capacity(self.numel());
        for (_, t) in tensors {
            let t = if t.dtype() == DType::F32 {
                t.clone()
            } else {
                t.to_dtype(DType::F32)?
            };
            flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(flat)
    }

    /// Checks that named tensors follow this layout, naming the first difference.
    pub fn check(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        if tensors.len() != self.entries.len() {
            return Err(Error::ParamMismatch(format!(
                "{} tensors given, the layout has {}",
                tensors.len(),
                self.entries.len()
            )));
        }
        for ((k, shape), (k2, t)) in self.entries.iter().zip(tensors) {
            if k != k2 {
                return Err(Error::ParamMismatch(format!(
                    "expected `{k}`, found `{k2}`"
                )));
            }
            if t.dims() != shape.as_slice() {
                return Err(Error::ParamMismatch(format!(
                    "`{k}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
        }
        Ok(())
    }
}

/// Gradients of the adapter parameters, one per key, in [`ParamLayout`] order (sorted by
/// PEFT key). They are gradients of the loss *sum* (Σ −logp·w for cross_entropy): divide by
/// the global weight sum (after the all-reduce) for the mean's gradient.
#[derive(Debug, Clone)]
pub struct Gradients {
    layout: ParamLayout,
    tensors: Vec<(String, Tensor)>,
}

impl Gradients {
    /// Wraps tensors that follow `layout`.
    pub fn new(layout: ParamLayout, tensors: Vec<(String, Tensor)>) -> Result<Self> {
        layout.check(&tensors)?;
        Ok(Gradients { layout, tensors })
    }

    /// Rebuilds gradients from a flat buffer (e.g. after an all-reduce).
    pub fn from_flat(layout: &ParamLayout, flat: &[f32], device: &Device) -> Result<Self> {
        let tensors = layout.unflatten(flat, device)?;
        Ok(Gradients {
            layout: layout.clone(),
            tensors,
        })
    }

    /// One flat f32 buffer in layout order.
    pub fn to_flat(&self) -> Result<Vec<f32>> {
        self.layout.flatten(&self.tensors)
    }

    /// One flat f32 tensor in layout order, concatenated on the gradients' device (no host
    /// round trip on a GPU).
    pub fn flat_tensor(&self) -> Result<Tensor> {
        let parts = self
            .tensors
            .iter()
            .map(|(_, t)| t.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// `(PEFT key, gradient)` in order.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// The gradient of one key.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.layout.index_of(key).map(|i| &self.tensors[i].1)
    }

    /// Multiplies every gradient by `factor` (e.g. 1 / Σw to get the mean's gradient).
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for (_, t) in &mut self.tensors {
            *t = (&*t * factor)?;
        }
        Ok(())
    }

    /// Adds another set of gradients with the same layout (micro-batch accumulation).
    pub fn add_assign(&mut self, other: &Gradients) -> Result<()> {
        if self.layout != other.layout {
            return Err(Error::ParamMismatch(
                "adding gradients of different layouts".into(),
            ));
        }
        for ((_, a), (_, b)) in self.tensors.iter_mut().zip(&other.tensors) {
            *a = (&*a + b)?;
        }
        Ok(())
    }

    /// √Σ g² over every tensor, accumulated in f64.
    pub fn global_norm(&self) -> Result<f64> {
        let flat = self.to_flat()?;
        Ok(flat
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// unflatten then flatten gives back the very bits, in layout order, and flatten takes
    /// non-f32 tensors.
    #[test]
    fn flatten_and_unflatten_round_trip_exactly() {
        let layout = ParamLayout::new(vec![
            ("b.lora_B.weight".into(), vec![3, 2]),
            ("a.lora_A.weight".into(), vec![2, 5]),
            ("c.lora_A.weight".into(), vec![7]),
        ])
        .unwrap();
        assert_eq!(layout.numel(), 23);
        let flat: Vec<f32> = (0..23)
            .map(|i| (i as f32 * 0.731).sin() * 1e3 + f32::EPSILON * i as f32)
            .collect();
        let tensors = layout.unflatten(&flat, &Device::Cpu).unwrap();
        let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["a.lora_A.weight", "b.lora_B.weight", "c.lora_A.weight"]
        );
        assert_eq!(tensors[0].1.dims(), &[2, 5]);
        assert_eq!(
            tensors[1].1.to_vec2::<f32>().unwrap(),
            vec![
                flat[10..12].to_vec(),
                flat[12..14].to_vec(),
                flat[14..16].to_vec()
            ]
        );
        let back = layout.flatten(&tensors).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&flat));

        // bf16 tensors are widened exactly.
        let half: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap()))
            .collect();
        let wide = layout.flatten(&half).unwrap();
        let expect: Vec<f32> = flat
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(bits(&wide), bits(&expect));

        assert!(layout.unflatten(&flat[1..], &Device::Cpu).is_err());
        assert!(layout.flatten(&tensors[1..]).is_err());
    }
}
