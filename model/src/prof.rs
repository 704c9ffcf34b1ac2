//! The stream profile of a real step: where a step's time goes, op by op, without
//! synchronising the device between ops.
//!
//! [`capture`] runs a closure (a training step) with profiling on. Every custom op of this
//! crate marks its forward and its backward (`span(name, Kind::Op, device)`), and
//! [`crate::LoraModel::forward_backward`] marks its phases (trunk forward, head, trunk
//! backward). On a GPU a mark is a CUDA event recorded on the device's stream, so the
//! device runs the step exactly as it would unprofiled (an event record is a few µs of host
//! time and nothing on the device); the events are read once, after the step. On the CPU,
//! where ops run synchronously, a mark is the host clock.
//!
//! Only the outermost op is counted where ops nest (a backward that applies another op),
//! so the op rows never count a stretch of the stream twice, and what they do not cover —
//! candle's own kernels (adds, casts, copies, the autograd's bookkeeping), host gaps in
//! which the device idles — is one row of its own. The per-op table of
//! [`crate::LoraModel::profile_ops`] synchronises around each op and times its backward
//! through a surrogate; this profile is what one real step does.
//!
//! Capture is per thread: spans count on the thread that runs [`capture`] (where candle
//! applies the ops; their kernels' own threads do not matter). Off (the default), a span
//! costs one thread-local read.

use crate::Result;
use candle_core::Device;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::time::Instant;

/// What a span marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A stretch of a step (trunk forward, head, …); phases may hold ops.
    Phase,
    /// One op's forward or backward; counted only where no other op span is open.
    Op,
}

thread_local! {
    /// Whether a capture runs on this thread.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// Op spans open on this thread.
    static OP_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The capture's closed spans.
    static RECORDS: RefCell<Vec<Raw>> = const { RefCell::new(Vec::new()) };
}

/// A point on the device's timeline.
enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Event(candle_core::cuda::cudarc::driver::CudaEvent),
}

impl Mark {
    fn now(device: &Device) -> Result<Self> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
                let e = d
                    .cuda_stream()
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| crate::Error::Unsupported(format!("profile event: {e:?}")))?;
                Ok(Mark::Event(e))
            }
            _ => Ok(Mark::Host(Instant::now())),
        }
    }

    /// Milliseconds from `base` to `self` (after the device has synchronised).
    fn ms_since(&self, base: &Mark) -> Result<f64> {
        match (base, self) {
            (Mark::Host(a), Mark::Host(b)) => Ok(b.duration_since(*a).as_secs_f64() * 1e3),
            #[cfg(feature = "cuda")]
            (Mark::Event(a), Mark::Event(b)) => a
                .elapsed_ms(b)
                .map(f64::from)
                .map_err(|e| crate::Error::Unsupported(format!("profile event: {e:?}"))),
            #[cfg(feature = "cuda")]
            _ => Err(crate::Error::Unsupported(
                "profile: host and device marks in one capture".into(),
            )),
        }
    }
}

struct Raw {
    name: &'static str,
    kind: Kind,
    start: Mark,
    end: Mark,
    host_ms: f64,
}

/// An open span; its end is marked when it drops.
pub struct Span {
    name: &'static str,
    kind: Kind,
    start: Option<Mark>,
    opened: Instant,
    device: Device,
}

/// Opens a span named `name` on `device`'s timeline, or `None` when no capture runs on
/// this thread (or, for [`Kind::Op`], when an op span is already open on it).
pub fn span(name: &'static str, kind: Kind, device: &Device) -> Option<Span> {
    if !ACTIVE.with(Cell::get) {
        return None;
    }
    if kind == Kind::Op {
        let nested = OP_DEPTH.with(|d| {
            let n = d.get();
            d.set(n + 1);
            n > 0
        });
        if nested {
            OP_DEPTH.with(|d| d.set(d.get() - 1));
            return None;
        }
    }
    Some(Span {
        name,
        kind,
        // A mark that fails leaves the span out of the profile rather than failing the op.
        start: Mark::now(device).ok(),
        opened: Instant::now(),
        device: device.clone(),
    })
}

/// [`span`] of an op applied to `t` (on `t`'s device).
pub(crate) fn op(name: &'static str, t: &candle_core::Tensor) -> Option<Span> {
    span(name, Kind::Op, t.device())
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.kind == Kind::Op {
            OP_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
        let (Some(start), Ok(end)) = (self.start.take(), Mark::now(&self.device)) else {
            return;
        };
        RECORDS.with(|r| {
            r.borrow_mut().push(Raw {
                name: self.name,
                kind: self.kind,
                start,
                end,
                host_ms: self.opened.elapsed().as_secs_f64() * 1e3,
            })
        });
    }
}

/// One span, in milliseconds from the start of the capture.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub name: String,
    pub kind: Kind,
    pub start_ms: f64,
    pub end_ms: f64,
    /// Host time from opening the span to closing it: issuing the work, on a GPU.
    pub host_ms: f64,
}

/// A name's total over the capture.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub calls: usize,
    /// Device time.
    pub ms: f64,
    /// Host time (see [`Record::host_ms`]). On a GPU, host time above device time in a
    /// stretch without synchronisation means the device waited for the host there.
    pub host_ms: f64,
}

impl Row {
    fn new(name: &str, ms: f64, host_ms: f64) -> Self {
        Row {
            name: name.to_string(),
            calls: 1,
            ms,
            host_ms,
        }
    }

    fn add(&mut self, ms: f64, host_ms: f64) {
        self.calls += 1;
        self.ms += ms;
        self.host_ms += host_ms;
    }
}

/// Where one captured stretch of work went (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Device time from the start of the capture to its end (all work it queued done).
    pub total_ms: f64,
    /// Host time until the closure returned (everything queued; includes the host's own
    /// waits, e.g. for a loss read back).
    pub host_ms: f64,
    /// Phases, in order of first appearance.
    pub phases: Vec<Row>,
    /// Ops, longest first.
    pub ops: Vec<Row>,
    /// `total_ms` minus the ops' time: candle's own kernels, and the device idle.
    pub outside_ops_ms: f64,
}

impl Profile {
    /// Sums `records` by kind and name.
    pub fn from_records(records: &[Record], total_ms: f64, host_ms: f64) -> Self {
        let mut phases: Vec<Row> = Vec::new();
        let mut ops: HashMap<&str, Row> = HashMap::new();
        for r in records {
            let ms = (r.end_ms - r.start_ms).max(0.0);
            match r.kind {
                Kind::Phase => match phases.iter_mut().find(|p| p.name == r.name) {
                    Some(p) => p.add(ms, r.host_ms),
                    None => phases.push(Row::new(&r.name, ms, r.host_ms)),
                },
                Kind::Op => match ops.get_mut(r.name.as_str()) {
                    Some(o) => o.add(ms, r.host_ms),
                    None => {
                        ops.insert(&r.name, Row::new(&r.name, ms, r.host_ms));
                    }
                },
            }
        }
        let mut ops: Vec<Row> = ops.into_values().collect();
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        let in_ops: f64 = ops.iter().map(|o| o.ms).sum();
        Profile {
            total_ms,
            host_ms,
            phases,
            ops,
            outside_ops_ms: (total_ms - in_ops).max(0.0),
        }
    }
}

impl fmt::Display for Profile {
    /// Markdown tables: the phases, then the ops with their share of the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let share = |ms: f64| {
            if self.total_ms > 0.0 {
                100.0 * ms / self.total_ms
            } else {
                0.0
            }
        };
        writeln!(
            f,
            "{:.2} ms on the device; the host had queued everything after {:.2} ms",
            self.total_ms, self.host_ms
        )?;
        writeln!(f)?;
        writeln!(f, "| phase | calls | ms | host ms | share |")?;
        writeln!(f, "|---|---|---|---|---|")?;
        for p in &self.phases {
            writeln!(
                f,
                "| {} | {} | {:.2} | {:.2} | {:.1}% |",
                p.name,
                p.calls,
                p.ms,
                p.host_ms,
                share(p.ms)
            )?;
        }
        writeln!(f)?;
        writeln!(f, "| op | calls | ms | ms per call | host ms | share |")?;
        writeln!(f, "|---|---|---|---|---|---|")?;
        for o in &self.ops {
            writeln!(
                f,
                "| {} | {} | {:.2} | {:.3} | {:.2} | {:.1}% |",
                o.name,
                o.calls,
                o.ms,
                o.ms / o.calls.max(1) as f64,
                o.host_ms,
                share(o.ms)
            )?;
        }
        writeln!(
            f,
            "| outside these ops (candle's own kernels, device idle) | | {:.2} | | | {:.1}% |",
            self.outside_ops_ms,
            share(self.outside_ops_ms)
        )
    }
}

/// Runs `f` with profiling on and returns its value with the profile of the work it
/// queued on `device` (which is synchronised at the end), from the spans this thread
/// opened meanwhile. A capture inside a capture on the same thread is an error.
pub fn capture<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, Profile)> {
    if ACTIVE.with(Cell::get) {
        return Err(crate::Error::Unsupported(
            "profile: a capture is already running on this thread".into(),
        ));
    }
    RECORDS.with(|r| r.borrow_mut().clear());
    device.synchronize()?;
    let base = Mark::now(device)?;
    let t0 = Instant::now();
    /// Ends the capture even when `f` panics.
    struct On;
    impl Drop for On {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(false));
        }
    }
    ACTIVE.with(|a| a.set(true));
    let on = On;
    let value = f();
    drop(on);
    let host_ms = t0.elapsed().as_secs_f64() * 1e3;
    let end = Mark::now(device)?;
    device.synchronize()?;
    let raws = RECORDS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    let value = value?;
    let records = raws
        .iter()
        .map(|r| {
            Ok(Record {
                name: r.name.to_string(),
                kind: r.kind,
                start_ms: r.start.ms_since(&base)?,
                end_ms: r.end.ms_since(&base)?,
                host_ms: r.host_ms,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let total_ms = end.ms_since(&base)?;
    Ok((value, Profile::from_records(&records, total_ms, host_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, kind: Kind, start_ms: f64, end_ms: f64) -> Record {
        Record {
            name: name.into(),
            kind,
            start_ms,
            end_ms,
            host_ms: 0.5,
        }
    }

    #[test]
    fn sums_by_name_and_kind() {
        let p = Profile::from_records(
            &[
                rec("fwd", Kind::Phase, 0.0, 4.0),
                rec("a", Kind::Op, 0.5, 1.5),
                rec("b", Kind::Op, 1.5, 3.5),
                rec("a", Kind::Op, 3.5, 4.0),
                rec("bwd", Kind::Phase, 4.0, 9.0),
                rec("b", Kind::Op, 4.0, 8.0),
            ],
            10.0,
            7.0,
        );
        assert_eq!(p.phases.len(), 2);
        assert_eq!((p.phases[0].name.as_str(), p.phases[0].ms), ("fwd", 4.0));
        assert_eq!((p.phases[1].name.as_str(), p.phases[1].ms), ("bwd", 5.0));
        // Longest first.
        assert_eq!(
            p.ops,
            vec![
                Row {
                    name: "b".into(),
                    calls: 2,
                    ms: 6.0,
                    host_ms: 1.0
                },
                Row {
                    name: "a".into(),
                    calls: 2,
                    ms: 1.5,
                    host_ms: 1.0
                },
            ]
        );
        assert_eq!(p.outside_ops_ms, 2.5);
        let text = p.to_string();
        assert!(
            text.contains("| b | 2 | 6.00 | 3.000 | 1.00 | 60.0% |"),
            "{text}"
        );
        assert!(text.contains("| 2.50 | | | 25.0% |"), "{text}");
    }

    #[test]
    fn off_outside_a_capture_and_nested_ops_count_once() {
        let cpu = Device::Cpu;
        assert!(span("x", Kind::Op, &cpu).is_none());
        let ((), p) = capture(&cpu, || {
            let _phase = span("phase", Kind::Phase, &cpu);
            let outer = span("outer", Kind::Op, &cpu);
            assert!(outer.is_some());
            // An op applied inside another op's span is part of the outer one.
            assert!(span("inner", Kind::Op, &cpu).is_none());
            drop(outer);
            // Closed: the next op counts again.
            assert!(span("next", Kind::Op, &cpu).is_some());
            Ok(())
        })
        .unwrap();
        let names: Vec<&str> = p.ops.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"outer") && names.contains(&"next"));
        assert_eq!(p.phases[0].name, "phase");
        assert!(p.total_ms >= p.phases[0].ms);
        assert!(span("x", Kind::Op, &cpu).is_none());
    }
}
