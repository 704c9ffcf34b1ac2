//! Learning-rate schedules as a pure function of the step: constant, linear decay and
//! cosine decay, each with an optional linear warmup. No state, so resume needs nothing.

/// The shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    /// Stays at the peak.
    #[default]
    Constant,
    /// Straight line from the peak to `min_lr` at `total_steps`.
    Linear,
    /// Half cosine from the peak to `min_lr` at `total_steps`.
    Cosine,
}

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Decay shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Learning rate at the end of the decay (0 for tinker's linear/cosine).
    pub min_lr: f64,
    /// Steps of linear warmup from 0 to the peak.
    pub warmup_steps: u64,
    /// Steps of the whole run (warmup included).
    pub total_steps: u64,
}

impl LrSchedule {
    /// A constant learning rate.
    pub fn constant(lr: f64) -> Self {
        LrSchedule {
            kind: ScheduleKind::Constant,
            peak_lr: lr,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 0,
        }
    }

    /// The learning rate for 0-based `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        lr_at(self, step)
    }
}

/// The learning rate for 0-based `step` (the step about to be taken).
///
/// Warmup: `peak · (step + 1) / warmup_steps` for `step < warmup_steps`, so the first step
/// is not wasted at lr 0. Decay: progress `p = (step − warmup) / (total − warmup)` clamped
/// to [0, 1]; linear `min + (peak − min)(1 − p)`, cosine `min + (peak − min)(1 + cos πp)/2`.
pub fn lr_at(s: &LrSchedule, step: u64) -> f64 {
    if step < s.warmup_steps {
        return s.peak_lr * (step + 1) as f64 / s.warmup_steps as f64;
    }
    let decay_steps = s.total_steps.saturating_sub(s.warmup_steps);
    let p = if decay_steps == 0 {
        0.0
    } else {
        ((step - s.warmup_steps) as f64 / decay_steps as f64).clamp(0.0, 1.0)
    };
    let span = s.peak_lr - s.min_lr;
    match s.kind {
        ScheduleKind::Constant => s.peak_lr,
        ScheduleKind::Linear => s.min_lr + span * (1.0 - p),
        ScheduleKind::Cosine => s.min_lr + span * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64) -> LrSchedule {
        LrSchedule {
            kind,
            peak_lr: 1.0,
            min_lr: 0.0,
            warmup_steps: warmup,
            total_steps: 10,
        }
    }

    #[test]
    fn constant_stays() {
        let s = sched(ScheduleKind::Constant, 0);
        assert!((0..20).all(|i| s.lr_at(i) == 1.0));
    }

    #[test]
    fn linear_and_cosine_reach_min_at_total() {
        for kind in [ScheduleKind::Linear, ScheduleKind::Cosine] {
            let s = sched(kind, 0);
            assert_eq!(s.lr_at(0), 1.0);
            assert!(s.lr_at(10).abs() < 1e-12);
            assert!(s.lr_at(50).abs() < 1e-12);
            assert!(
                (1..10).all(|i| s.lr_at(i) < s.lr_at(i - 1)),
                "{kind:?} must decrease"
            );
        }
        assert!((sched(ScheduleKind::Linear, 0).lr_at(5) - 0.5).abs() < 1e-12);
        assert!((sched(ScheduleKind::Cosine, 0).lr_at(5) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn warmup_ramps_then_decays() {
        let s = sched(ScheduleKind::Linear, 4);
        assert_eq!([s.lr_at(0), s.lr_at(1), s.lr_at(3)], [0.25, 0.5, 1.0]);
        assert_eq!(s.lr_at(4), 1.0);
        assert!((s.lr_at(7) - 0.5).abs() < 1e-12);
    }
}
