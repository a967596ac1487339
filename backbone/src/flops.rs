//! FLOP counting by walking the real model at the real input shape.
//!
//! The field's convention (fvcore / mmcv `get_flops`): one multiply-add is one FLOP, and only
//! convolution, linear and matmul layers count. Every layer in [`crate::nn`] reports its
//! multiply-adds here while a [`count`] scope is open on the current thread; outside a scope
//! recording is a cheap no-op, so the same forward code serves training, inference and counting.

use std::cell::RefCell;
use std::collections::BTreeMap;

/// Multiply-adds recorded during one [`count`] scope, in total and per layer kind.
#[derive(Debug, Clone, Default)]
pub struct FlopTally {
    pub total: f64,
    pub by_kind: BTreeMap<&'static str, f64>,
}

thread_local! {
    static ACTIVE: RefCell<Option<FlopTally>> = const { RefCell::new(None) };
}

/// Record `macs` multiply-adds of a layer of the given kind ("conv", "linear", "matmul", ...).
pub fn record(kind: &'static str, macs: f64) {
    ACTIVE.with(|a| {
        if let Some(t) = a.borrow_mut().as_mut() {
            t.total += macs;
            *t.by_kind.entry(kind).or_insert(0.0) += macs;
        }
    });
}

/// True while a counting scope is open (lets callers skip work that only matters for counting).
pub fn is_counting() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// Run `f` with FLOP recording on, returning its result and what it recorded.
/// Scopes do not nest: an inner scope's recording is folded into the outer one.
pub fn count<T>(f: impl FnOnce() -> T) -> (T, FlopTally) {
    let outer = ACTIVE.with(|a| a.borrow_mut().replace(FlopTally::default()));
    let out = f();
    let tally = ACTIVE.with(|a| a.borrow_mut().take()).unwrap_or_default();
    if let Some(mut o) = outer {
        o.total += tally.total;
        for (k, v) in &tally.by_kind {
            *o.by_kind.entry(k).or_insert(0.0) += v;
        }
        ACTIVE.with(|a| *a.borrow_mut() = Some(o));
    }
    (out, tally)
}

/// Multiply-adds of `a @ b` for tensors of the given shapes (broadcast batch dims).
pub fn matmul_macs(a: &[i64], b: &[i64]) -> f64 {
    let out_rows: i64 = a[..a.len() - 1].iter().product();
    let k = *a.last().unwrap_or(&1);
    let n = *b.last().unwrap_or(&1);
    (out_rows * k * n) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_inside_scope_and_folds_nested() {
        record("conv", 5.0);
        let ((), outer) = count(|| {
            record("conv", 2.0);
            let ((), inner) = count(|| record("linear", 3.0));
            assert_eq!(inner.total, 3.0);
        });
        assert_eq!(outer.total, 5.0);
        assert_eq!(outer.by_kind["linear"], 3.0);
        assert!(!is_counting());
    }

    #[test]
    fn matmul_shape() {
        assert_eq!(matmul_macs(&[2, 3, 4], &[4, 5]), 2.0 * 3.0 * 4.0 * 5.0);
    }
}
