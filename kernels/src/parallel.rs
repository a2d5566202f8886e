//! Which loops of a kernel description may run across the threads of a
//! block: the analysis behind the CUDA lowering's block-per-row shape.
//!
//! A row's loops over `hidden` or `ffn` run in one thread in the
//! thread-per-row shape, where neighbouring threads read addresses a row
//! apart and nothing coalesces. In the block-per-row shape a block runs a
//! row and the *parallel* loops hand their iterations to its threads in
//! turn (iteration `start + t`, `start + t + blockDim`, ...), so a warp reads
//! consecutive elements; every other statement runs in every thread, each
//! with its own copies of the row's variables and local arrays.
//!
//! That computes what the description says exactly when no iteration of a
//! parallel loop can see or undo another's effects, and nothing outside the
//! loops writes memory. [`parallel_loops`] checks, conservatively:
//!
//! 1. the kernel has no buffer it both reads and writes (a thread could read
//!    what another wrote) and no local arrays in a scratch block;
//! 2. a loop is parallel when its body stores to no local array; every
//!    variable it assigns (its own and nested loops' variables included) is
//!    assigned in each iteration before it is read there, and is read
//!    nowhere outside the loop; and every buffer store in it has an index
//!    that depends on the loop's variable (directly, or through a variable
//!    or nested loop bound computed from it), so iterations write disjoint
//!    elements;
//! 3. the outermost parallel loops are taken (their nested loops run in
//!    their thread), except that when the parallel loops inside one hold all
//!    its stores and are wide (32 iterations or more, or bounds known only
//!    at run time), or it is short itself, those are taken instead: a warp
//!    then reads consecutive elements (`permute` shares its loop over
//!    `hidden`, not the one over `top_k`; `dequantize_fp8` the elements of
//!    each 128-block). Every buffer store must lie in a taken loop.
//!
//! When no loop qualifies, or a store lies outside them, the kernel keeps the
//! thread-per-row shape. The host tests run the generated code with threads
//! in reversed order against the interpreter, bit for bit.

use std::collections::{BTreeMap, BTreeSet};

use crate::ir::{Access, Expr, Kernel, ParamKind, Stmt, VarId};

/// Below this many iterations (literal bounds) a loop is short: a parallel
/// loop that is short, or whose nested parallel loops are all wide, leaves
/// the sharing to those.
const MIN_SHARED_TRIPS: i64 = 32;

/// The pre-order numbers (counting every `for` of the body, in the order
/// the lowering visits them) of the loops a block's threads share, or
/// `None` when the kernel keeps one thread per row.
pub fn parallel_loops(kernel: &Kernel, scratch: bool) -> Option<BTreeSet<u32>> {
    if scratch {
        return None;
    }
    let read_write = kernel.params.iter().any(|p| {
        matches!(
            p.kind,
            ParamKind::Buffer {
                access: Access::ReadWrite,
                ..
            }
        )
    });
    if read_write {
        return None;
    }
    let mut chosen = BTreeMap::new();
    let mut counter = 0u32;
    if !choose(&kernel.body, &kernel.body, &mut counter, &mut chosen) {
        return None;
    }
    (!chosen.is_empty()).then(|| chosen.into_keys().collect())
}

/// Walks `body` in pre-order, numbering loops; takes each outermost
/// parallel loop, or the parallel loops inside it (see the module's rule
/// 3). False when a store lies outside every taken loop. `chosen` maps a
/// taken loop to whether it is wide.
fn choose(
    body: &[Stmt],
    kernel: &[Stmt],
    counter: &mut u32,
    chosen: &mut BTreeMap<u32, bool>,
) -> bool {
    for s in body {
        match s {
            Stmt::Store { .. } => return false,
            Stmt::Set(..) | Stmt::ArrayStore { .. } => {}
            Stmt::For { body: inner, .. } => {
                let me = *counter;
                *counter += 1;
                if is_parallel(s, kernel) {
                    let mut inside = BTreeMap::new();
                    let mut inner_counter = *counter;
                    let covered = choose(inner, kernel, &mut inner_counter, &mut inside)
                        && !inside.is_empty();
                    // Share the loops inside instead when they are wide (a
                    // warp then reads consecutive elements), or when this one
                    // is short (over top-k, say).
                    if covered && (inside.values().all(|&w| w) || !wide(s)) {
                        chosen.extend(inside);
                    } else {
                        chosen.insert(me, wide(s));
                    }
                    *counter += count_loops(inner);
                } else if !choose(inner, kernel, counter, chosen) {
                    return false;
                }
            }
            Stmt::If {
                then, otherwise, ..
            } => {
                if !choose(then, kernel, counter, chosen)
                    || !choose(otherwise, kernel, counter, chosen)
                {
                    return false;
                }
            }
        }
    }
    true
}

/// A loop of at least [`MIN_SHARED_TRIPS`] iterations, or of bounds only
/// known at run time.
fn wide(s: &Stmt) -> bool {
    match s {
        Stmt::For {
            start: Expr::I64(a),
            end: Expr::I64(b),
            ..
        } => b - a >= MIN_SHARED_TRIPS,
        _ => true,
    }
}

fn count_loops(body: &[Stmt]) -> u32 {
    body.iter()
        .map(|s| match s {
            Stmt::For { body, .. } => 1 + count_loops(body),
            Stmt::If {
                then, otherwise, ..
            } => count_loops(then) + count_loops(otherwise),
            _ => 0,
        })
        .sum()
}

/// Whether the loop `s` may hand its iterations to a block's threads.
fn is_parallel(s: &Stmt, kernel: &[Stmt]) -> bool {
    let Stmt::For { var, body, .. } = s else {
        return false;
    };
    let mut written = BTreeSet::from([*var]);
    let mut array_store = false;
    assigned(body, &mut written, &mut array_store);
    if array_store {
        return false;
    }
    // Read nowhere outside the loop.
    let mut outside = BTreeSet::new();
    crate::ir::visit_reads(kernel, Some(s), &mut |v| {
        outside.insert(v);
    });
    if written.iter().any(|v| outside.contains(v)) {
        return false;
    }
    // Assigned before read in every iteration.
    let mut defined = BTreeSet::from([*var]);
    if !defined_before_use(body, &written, &mut defined) {
        return false;
    }
    // Every store's index depends on the iteration.
    let tainted = tainted(body, *var);
    stores_depend_on(body, &tainted)
}

/// Variables `body` assigns (nested loops' variables included); whether it
/// stores to a local array.
fn assigned(body: &[Stmt], out: &mut BTreeSet<VarId>, array_store: &mut bool) {
    for s in body {
        match s {
            Stmt::Set(v, _) => {
                out.insert(*v);
            }
            Stmt::ArrayStore { .. } => *array_store = true,
            Stmt::Store { .. } => {}
            Stmt::For { var, body, .. } => {
                out.insert(*var);
                assigned(body, out, array_store);
            }
            Stmt::If {
                then, otherwise, ..
            } => {
                assigned(then, out, array_store);
                assigned(otherwise, out, array_store);
            }
        }
    }
}

fn expr_vars(e: &Expr, out: &mut BTreeSet<VarId>) {
    e.visit_vars(&mut |v| {
        out.insert(v);
    });
}

/// Whether every read in `body` of a variable of `written` comes after an
/// assignment of it in the same iteration (`defined`: those assigned so far
/// on every path).
fn defined_before_use(
    body: &[Stmt],
    written: &BTreeSet<VarId>,
    defined: &mut BTreeSet<VarId>,
) -> bool {
    let ok = |e: &Expr, defined: &BTreeSet<VarId>| {
        let mut used = BTreeSet::new();
        expr_vars(e, &mut used);
        used.iter()
            .all(|v| !written.contains(v) || defined.contains(v))
    };
    for s in body {
        match s {
            Stmt::Set(v, e) => {
                if !ok(e, defined) {
                    return false;
                }
                defined.insert(*v);
            }
            Stmt::Store { index, value, .. } | Stmt::ArrayStore { index, value, .. } => {
                if !ok(index, defined) || !ok(value, defined) {
                    return false;
                }
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                if !ok(start, defined) || !ok(end, defined) {
                    return false;
                }
                // Inside, its variable is defined; what the body assigns
                // counts only inside (the loop may run no iteration).
                let mut inner = defined.clone();
                inner.insert(*var);
                if !defined_before_use(body, written, &mut inner) {
                    return false;
                }
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                if !ok(cond, defined) {
                    return false;
                }
                let mut a = defined.clone();
                let mut b = defined.clone();
                if !defined_before_use(then, written, &mut a)
                    || !defined_before_use(otherwise, written, &mut b)
                {
                    return false;
                }
                *defined = a.intersection(&b).copied().collect();
            }
        }
    }
    true
}

/// The variables whose value depends on the loop variable `var` within
/// `body`: `var`, variables assigned from them, and nested loop variables
/// whose bounds use them (to a fixed point).
fn tainted(body: &[Stmt], var: VarId) -> BTreeSet<VarId> {
    fn walk(body: &[Stmt], t: &mut BTreeSet<VarId>) -> bool {
        let mut grew = false;
        let uses = |e: &Expr, t: &BTreeSet<VarId>| {
            let mut u = BTreeSet::new();
            expr_vars(e, &mut u);
            u.iter().any(|v| t.contains(v))
        };
        for s in body {
            match s {
                Stmt::Set(v, e) => {
                    if uses(e, t) && t.insert(*v) {
                        grew = true;
                    }
                }
                Stmt::For {
                    var,
                    start,
                    end,
                    body,
                } => {
                    if (uses(start, t) || uses(end, t)) && t.insert(*var) {
                        grew = true;
                    }
                    grew |= walk(body, t);
                }
                Stmt::If {
                    then, otherwise, ..
                } => {
                    grew |= walk(then, t);
                    grew |= walk(otherwise, t);
                }
                Stmt::Store { .. } | Stmt::ArrayStore { .. } => {}
            }
        }
        grew
    }
    let mut t = BTreeSet::from([var]);
    while walk(body, &mut t) {}
    t
}

/// Whether every buffer store in `body` has an index that uses `tainted`.
fn stores_depend_on(body: &[Stmt], tainted: &BTreeSet<VarId>) -> bool {
    body.iter().all(|s| match s {
        Stmt::Store { index, .. } => {
            let mut u = BTreeSet::new();
            expr_vars(index, &mut u);
            u.iter().any(|v| tainted.contains(v))
        }
        Stmt::For { body, .. } => stores_depend_on(body, tainted),
        Stmt::If {
            then, otherwise, ..
        } => stores_depend_on(then, tainted) && stores_depend_on(otherwise, tainted),
        Stmt::Set(..) | Stmt::ArrayStore { .. } => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::library::{describe, Kind};

    fn consts(c: &[(&str, i64)]) -> Vec<(String, i64)> {
        c.iter().map(|(n, v)| ((*n).to_string(), *v)).collect()
    }

    fn shape(kind: Kind, c: &[(&str, i64)]) -> Option<BTreeSet<u32>> {
        let k = describe(kind, &consts(c)).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        parallel_loops(&k, false)
    }

    /// The streaming kernels share their loops over a row's elements; the
    /// router kernels, with carried maxima, sums and top-k arrays, and the
    /// shared gate, which rewrites its input, keep a thread per row.
    #[test]
    fn the_library_kernels_get_the_shape_they_should() {
        let row = [("dtype", 1), ("hidden", 64), ("top_k", 2)];
        for kind in [
            Kind::Permute,
            Kind::PermutePack,
            Kind::Pack,
            Kind::Unpermute,
            Kind::WeightedSum,
            Kind::UnpermuteWeightedSum,
            Kind::Add,
        ] {
            assert!(shape(kind, &row).is_some(), "{kind:?}");
        }
        // permute_pack: the loop over k stays in every thread (its body
        // stores at `slot · H + i`, which depends on the inner loop only),
        // the loop over H inside it is shared.
        assert_eq!(shape(Kind::PermutePack, &row), Some(BTreeSet::from([1])));
        // unpermute_weighted_sum: the loop over k fills local arrays; the
        // loop over H (with its private accumulator) is shared.
        assert_eq!(
            shape(Kind::UnpermuteWeightedSum, &row),
            Some(BTreeSet::from([1]))
        );
        let fp8 = [("dtype", 1), ("hidden", 300), ("block", 128)];
        // quantize: each 128-block (its maximum, scale and stores) is one
        // iteration; a thread takes whole blocks.
        assert_eq!(shape(Kind::QuantizeFp8, &fp8), Some(BTreeSet::from([0])));
        // dequantize: the loop over a block's elements holds every store, so
        // every thread walks the blocks and shares each block's elements.
        assert_eq!(shape(Kind::DequantizeFp8, &fp8), Some(BTreeSet::from([1])));
        let wide = [("dtype", 1), ("hidden", 7168), ("block", 128)];
        assert_eq!(shape(Kind::DequantizeFp8, &wide), Some(BTreeSet::from([1])));
        assert_eq!(shape(Kind::QuantizeFp8, &wide), Some(BTreeSet::from([0])));
        for act in [0, 1, 2, 3] {
            let c = [("dtype", 1), ("ffn", 48), ("act", act)];
            assert_eq!(
                shape(Kind::Activation, &c),
                Some(BTreeSet::from([0])),
                "act {act}"
            );
        }
        let store = [("dtype", 1), ("hidden", 64), ("bias", 1)];
        assert_eq!(shape(Kind::GemmStore, &store), Some(BTreeSet::from([0])));
        assert_eq!(shape(Kind::SharedGate, &row), None, "reads and writes `y`");
        let router = [("experts", 16), ("top_k", 2), ("dtype", 1)];
        assert_eq!(shape(Kind::RouterFused, &router), None);
    }

    fn var(i: u32) -> Expr {
        Expr::Var(VarId(i))
    }

    fn for_(v: u32, n: i64, body: Vec<Stmt>) -> Stmt {
        Stmt::For {
            var: VarId(v),
            start: Expr::I64(0),
            end: Expr::I64(n),
            body,
        }
    }

    fn store(index: Expr, value: Expr) -> Stmt {
        Stmt::Store {
            buf: crate::ir::ParamId(0),
            index,
            value,
        }
    }

    fn kernel(body: Vec<Stmt>) -> Kernel {
        use crate::ir::{Elem, Param, Ty, VarDecl};
        Kernel {
            name: "k".into(),
            params: vec![Param {
                name: "out".into(),
                kind: ParamKind::Buffer {
                    elem: Elem::F32,
                    access: Access::Write,
                },
            }],
            vars: (0..4)
                .map(|i| VarDecl {
                    name: format!("v{i}"),
                    ty: if i == 3 { Ty::F32 } else { Ty::I64 },
                })
                .collect(),
            arrays: vec![],
            body,
        }
    }

    /// What makes a loop sequential: a carried variable, a store that every
    /// iteration makes to the same element, a variable read after the loop.
    #[test]
    fn carried_values_and_shared_stores_keep_a_loop_sequential() {
        let add = |a, b| Expr::Binary(crate::ir::BinOp::Add, Box::new(a), Box::new(b));
        // for i { out[i] = 1 }: parallel.
        let ok = kernel(vec![for_(1, 8, vec![store(var(1), Expr::F32(1.0))])]);
        assert_eq!(parallel_loops(&ok, false), Some(BTreeSet::from([0])));
        // ... but not with a scratch block.
        assert_eq!(parallel_loops(&ok, true), None);
        // for i { c = c + 1.0; out[i] = c }: carried.
        let carried = kernel(vec![for_(
            1,
            8,
            vec![
                Stmt::Set(VarId(3), add(var(3), Expr::F32(1.0))),
                store(var(1), var(3)),
            ],
        )]);
        assert_eq!(parallel_loops(&carried, false), None);
        // for i { out[0] = i }: every iteration writes one element.
        let same = kernel(vec![for_(1, 8, vec![store(Expr::I64(0), var(1))])]);
        assert_eq!(parallel_loops(&same, false), None);
        // for i { c = i } then out[0] = c: read after the loop (and a store
        // outside every parallel loop).
        let after = kernel(vec![
            for_(1, 8, vec![Stmt::Set(VarId(2), var(1))]),
            store(Expr::I64(0), var(2)),
        ]);
        assert_eq!(parallel_loops(&after, false), None);
        // for i { j = i * 2; out[j] = 1 }: the index depends on i through j.
        let through = kernel(vec![for_(
            1,
            8,
            vec![
                Stmt::Set(VarId(2), add(var(1), var(1))),
                store(var(2), Expr::F32(1.0)),
            ],
        )]);
        assert_eq!(parallel_loops(&through, false), Some(BTreeSet::from([0])));
    }
}
