//! Failure injection for tests: makes chosen llama.cpp calls of the safe
//! wrappers fail on the calling thread, so that every failure path of the
//! engine (a compaction that llama.cpp refuses, a restore that fails too, a
//! window or draft decode that fails) can be driven on purpose and its
//! promise — the sequence is left exactly as it was — checked.
//!
//! A plan is per thread and inactive unless a test installs one: the cost in
//! production is one thread-local read per wrapped call. An injected
//! failure behaves as llama.cpp's own does: a failed
//! `llama_state_seq_set_data` leaves the sequence empty, a failed decode
//! evaluates nothing.

use std::cell::Cell;

/// A wrapped llama.cpp call that a [`FaultPlan`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// `ContextRef::state_seq_set` (compaction and restore).
    StateSet,
    /// `ContextRef::decode` (every evaluation: prompt, window, draft).
    Decode,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// The call fails as llama.cpp's would.
    Fail,
    /// The call panics (a bug, as a user's selector or snapkv itself could
    /// have): for the promises that must hold while unwinding.
    Panic,
}

#[derive(Clone, Copy)]
struct Plan {
    point: FaultPoint,
    effect: Effect,
    /// Calls at `point` that still succeed before the failures start.
    pass: u32,
    /// Calls at `point` that fail after those.
    fail: u32,
    /// Failures injected so far.
    injected: u32,
}

thread_local! {
    static PLAN: Cell<Option<Plan>> = const { Cell::new(None) };
}

/// Failures injected on this thread until the plan is dropped.
#[derive(Debug)]
pub struct FaultPlan {
    // Not Send: the plan belongs to the thread that installed it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl FaultPlan {
    /// Lets the next `pass` calls at `point` on this thread succeed, then
    /// makes the `fail` calls after them fail. Replaces any plan installed
    /// before.
    pub fn new(point: FaultPoint, pass: u32, fail: u32) -> Self {
        Self::install(point, Effect::Fail, pass, fail)
    }

    /// Lets the next `pass` calls at `point` succeed, then makes the one
    /// after them panic; the calls after that succeed.
    pub fn panic_after(point: FaultPoint, pass: u32) -> Self {
        Self::install(point, Effect::Panic, pass, 1)
    }

    fn install(point: FaultPoint, effect: Effect, pass: u32, fail: u32) -> Self {
        PLAN.with(|p| {
            p.set(Some(Plan {
                point,
                effect,
                pass,
                fail,
                injected: 0,
            }))
        });
        Self {
            _thread: std::marker::PhantomData,
        }
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u32 {
        PLAN.with(|p| p.get().map_or(0, |plan| plan.injected))
    }
}

impl Drop for FaultPlan {
    fn drop(&mut self) {
        PLAN.with(|p| p.set(None));
    }
}

/// Whether this call at `point` must fail (and counts it); panics instead
/// when the plan says so.
pub(crate) fn inject(point: FaultPoint) -> bool {
    PLAN.with(|p| {
        let Some(mut plan) = p.get() else { return false };
        if plan.point != point {
            return false;
        }
        let fail = if plan.pass > 0 {
            plan.pass -= 1;
            false
        } else if plan.fail > 0 {
            plan.fail -= 1;
            plan.injected += 1;
            true
        } else {
            false
        };
        p.set(Some(plan));
        if fail && plan.effect == Effect::Panic {
            panic!("panic injected by a test at {point:?} (snapkv::llama::faults)");
        }
        fail
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_passes_then_fails_then_passes_and_ends_with_its_guard() {
        assert!(!inject(FaultPoint::Decode));
        let plan = FaultPlan::new(FaultPoint::Decode, 2, 2);
        let seen: Vec<bool> = (0..5).map(|_| inject(FaultPoint::Decode)).collect();
        assert_eq!(seen, [false, false, true, true, false]);
        assert!(!inject(FaultPoint::StateSet));
        assert_eq!(plan.injected(), 2);
        drop(plan);
        let other = FaultPlan::new(FaultPoint::StateSet, 0, 1);
        assert!(!inject(FaultPoint::Decode));
        assert!(inject(FaultPoint::StateSet));
        drop(other);
        let _panics = FaultPlan::panic_after(FaultPoint::Decode, 1);
        assert!(!inject(FaultPoint::Decode));
        assert!(std::panic::catch_unwind(|| inject(FaultPoint::Decode)).is_err());
        assert!(!inject(FaultPoint::Decode));
    }
}
