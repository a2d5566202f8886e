//! Which ops a layer needs: the plan's ops held to its layer variant, so a
//! layer field changed without the ops (shared experts added, the router's
//! normalisation flipped in an unfused plan, fp8 dispatch) or an op moved to
//! another phase or another set of peers is refused.
//!
//! The router (fused, or the layer's exact chain of stages), the router
//! gate, both assignment passes, the expert GEMMs and their activation, the
//! permute and the combine (fused or as two kernels) once per chunk, fp8
//! casts exactly when the dispatch is fp8, the shared experts and their gate
//! exactly when the layer has them; every op in its phase; the routing
//! exchanged over the EP group, each chunk's dispatch and combine over the
//! group or as the hierarchical legs in order.

use super::consistency::kind_name;
use super::validate::PlanError;
use super::{CollectiveKind, DType, Epilogue, GemmWeight, KernelKind, Op, OpKind, Phase, Plan};

fn op_error(plan: &Plan, stream: usize, op: &Op, problem: impl Into<String>) -> PlanError {
    PlanError::Op {
        op: plan.op_ref(stream, op),
        problem: problem.into(),
    }
}

impl Plan {
    /// The ops the layer needs, and none it does not.
    pub(super) fn check_forms(&self) -> Result<(), PlanError> {
        let l = &self.layer;
        let form = |problem: String| Err(PlanError::Form { problem });
        let mut launches: Vec<(u32, KernelKind, Option<i64>)> = Vec::new();
        let mut gemms: Vec<(GemmWeight, Epilogue, Option<u64>)> = Vec::new();
        for (_, op) in self.ops() {
            match &op.kind {
                OpKind::Launch { kernel, .. } => {
                    if let Some(k) = self.kernels.get(*kernel as usize) {
                        let pass = k.constants.iter().find(|(n, _)| n == "pass").map(|p| p.1);
                        launches.push((op.id, k.kind, pass));
                    }
                }
                OpKind::Gemm {
                    weight, epilogue, ..
                } => gemms.push((*weight, *epilogue, op.chunk)),
                _ => {}
            }
        }
        launches.sort_by_key(|l| l.0);
        self.check_phases()?;
        self.check_collective_forms()?;
        self.check_collective_directions()?;
        let count = |kind: KernelKind| launches.iter().filter(|l| l.1 == kind).count();
        let gemm_count = |w: GemmWeight| gemms.iter().filter(|g| g.0 == w).count();
        // The router: the fused kernel, or the layer's chain of stages in order.
        let router: Vec<KernelKind> = launches
            .iter()
            .map(|l| l.1)
            .filter(|k| is_router(*k))
            .collect();
        let chain = router_chain(&l.router);
        if router != [KernelKind::RouterFused] && router != chain {
            let names: Vec<&str> = router.iter().map(|&k| kind_name(k)).collect();
            let chain: Vec<&str> = chain.iter().map(|&k| kind_name(k)).collect();
            return form(format!(
                "the router runs [{}], but the layer's router is `router_fused` or [{}]",
                names.join(", "),
                chain.join(", ")
            ));
        }
        if gemm_count(GemmWeight::RouterGate) != 1 {
            return form(format!(
                "the plan has {} router gate GEMMs, expected one",
                gemm_count(GemmWeight::RouterGate)
            ));
        }
        // Passes 0 and 1 once; by rank, passes 2 and 3 once per chunk.
        let chunk_count = if self.choices.chunks > 1 {
            self.choices.chunks
        } else {
            1
        };
        for pass in [0, 1, 2, 3] {
            let n = launches
                .iter()
                .filter(|l| l.1 == KernelKind::Assign && l.2 == Some(pass))
                .count() as u64;
            let want = match pass {
                0 | 1 => 1,
                _ if self.by_rank() => chunk_count,
                _ => 0,
            };
            if n != want {
                return form(format!(
                    "the plan has {n} assignment launches of pass {pass}, expected {want}"
                ));
            }
        }
        // Shared experts exactly when the layer has them.
        let shared = l.shared.as_ref();
        let shared_gemms = gemm_count(GemmWeight::SharedUp) + gemm_count(GemmWeight::SharedDown);
        let gate = count(KernelKind::SharedGate);
        let add = count(KernelKind::Add);
        let (want_gemms, want_gate, want_add) = match shared {
            Some(s) => (2, usize::from(s.sigmoid_gate), 1),
            None => (0, 0, 0),
        };
        if (shared_gemms, gate, add) != (want_gemms, want_gate, want_add) {
            return form(format!(
                "the plan has {shared_gemms} shared-expert GEMMs, {gate} shared gates and {add} adds, but the layer {} needs {want_gemms}, {want_gate} and {want_add}",
                match shared {
                    Some(s) if s.sigmoid_gate => "with gated shared experts",
                    Some(_) => "with shared experts",
                    None => "without shared experts",
                }
            ));
        }
        // Expert GEMMs: per chunk one up and one down projection, and the
        // activation in the up projection's epilogue or as a kernel.
        let chunks = self.choices.chunks;
        let chunked = gemms.iter().any(|g| g.2.is_some());
        let expected_per = if chunked { chunks } else { 1 };
        for w in [GemmWeight::ExpertUp, GemmWeight::ExpertDown] {
            if gemm_count(w) as u64 != expected_per {
                return form(format!(
                    "the plan has {} {} GEMMs, expected one per chunk ({expected_per})",
                    gemm_count(w),
                    if w == GemmWeight::ExpertUp {
                        "expert up"
                    } else {
                        "expert down"
                    }
                ));
            }
        }
        let fused_acts = gemms
            .iter()
            .filter(|g| g.0 == GemmWeight::ExpertUp && g.1 == Epilogue::Activation)
            .count() as u64;
        let shared_fused = gemms
            .iter()
            .filter(|g| g.0 == GemmWeight::SharedUp && g.1 == Epilogue::Activation)
            .count();
        let act_kernels = count(KernelKind::Activation) as u64;
        let want_acts =
            (expected_per - fused_acts) + u64::from(shared.is_some() && shared_fused == 0);
        if act_kernels != want_acts {
            return form(format!(
                "the plan has {act_kernels} activation launches, expected {want_acts} (the FFNs whose up projection does not apply it)"
            ));
        }
        // fp8 casts exactly when the dispatch is fp8, which the layer allows.
        let chosen = self.choices.dispatch_dtype;
        if chosen != l.dtype && chosen != l.dispatch_dtype {
            return form(format!(
                "`choices.dispatch_dtype` is {}, but the layer dispatches {} or {}",
                chosen.name(),
                l.dtype.name(),
                l.dispatch_dtype.name()
            ));
        }
        let fp8 = chosen == DType::Fp8E4m3;
        // The permute and the combine: fused, or as their two kernels, once
        // per chunk (plans that dispatch or reduce by rank have their own
        // kernels for them, checked by their shapes and the race checks).
        let by_rank_kinds = [
            KernelKind::PackRank,
            KernelKind::SumRank,
            KernelKind::Expand,
            KernelKind::Reduce,
        ];
        let pairs = if by_rank_kinds.iter().any(|&k| count(k) > 0) || self.by_rank() {
            Vec::new()
        } else {
            vec![
                (
                    KernelKind::PermutePack,
                    [KernelKind::Permute, KernelKind::Pack],
                ),
                (
                    KernelKind::UnpermuteWeightedSum,
                    [KernelKind::Unpermute, KernelKind::WeightedSum],
                ),
            ]
        };
        for (fused, parts) in pairs {
            let n = expected_per as usize;
            let (f, a, b) = (count(fused), count(parts[0]), count(parts[1]));
            if (f, a, b) != (n, 0, 0) && (f, a, b) != (0, n, n) {
                return form(format!(
                    "the plan has {f} `{}`, {a} `{}` and {b} `{}` launches, expected the fused kernel or the other two once per chunk ({n})",
                    kind_name(fused),
                    kind_name(parts[0]),
                    kind_name(parts[1])
                ));
            }
        }
        for kind in [KernelKind::QuantizeFp8, KernelKind::DequantizeFp8] {
            if (count(kind) > 0) != fp8 {
                return form(format!(
                    "the plan has {} `{}` launches, but the dispatch is {}",
                    count(kind),
                    kind_name(kind),
                    self.choices.dispatch_dtype.name()
                ));
            }
        }
        Ok(())
    }
}

impl Plan {
    /// Every op in the phase its work belongs to (a launch's binding and rows
    /// depend on it: an activation in the shared phase covers every token).
    fn check_phases(&self) -> Result<(), PlanError> {
        use Phase as P;
        for (s, op) in self.ops() {
            let (allowed, what): (&[Phase], String) = match &op.kind {
                OpKind::Launch { kernel, .. } => {
                    let Some(k) = self.kernels.get(*kernel as usize) else {
                        continue;
                    };
                    let pass = k.constants.iter().find(|(n, _)| n == "pass").map(|p| p.1);
                    let phases: &[Phase] = match k.kind {
                        KernelKind::Assign => match pass {
                            Some(2) => &[P::Permute],
                            Some(3) => &[P::Experts],
                            _ => &[P::Router],
                        },
                        kind if is_router(kind) => &[P::Router],
                        KernelKind::Permute
                        | KernelKind::PermutePack
                        | KernelKind::PackRank
                        | KernelKind::Pack
                        | KernelKind::QuantizeFp8 => &[P::Permute],
                        KernelKind::DequantizeFp8 | KernelKind::Expand => &[P::Experts],
                        KernelKind::Activation => &[P::Experts, P::Shared],
                        KernelKind::Unpermute
                        | KernelKind::WeightedSum
                        | KernelKind::UnpermuteWeightedSum
                        | KernelKind::Reduce
                        | KernelKind::SumRank => &[P::Unpermute],
                        KernelKind::SharedGate => &[P::Shared],
                        KernelKind::Add => &[P::Output],
                        _ => &[],
                    };
                    (phases, format!("a `{}` launch", kind_name(k.kind)))
                }
                OpKind::Gemm { weight, .. } => {
                    let phases: &[Phase] = match weight {
                        GemmWeight::RouterGate => &[P::Router],
                        GemmWeight::ExpertUp | GemmWeight::ExpertDown => &[P::Experts],
                        GemmWeight::SharedUp | GemmWeight::SharedDown => &[P::Shared],
                    };
                    (phases, "a GEMM of these weights".to_string())
                }
                OpKind::Collective { kind, .. } => {
                    let phases: &[Phase] = match kind {
                        CollectiveKind::CountExchange | CollectiveKind::AllGather => &[P::Router],
                        CollectiveKind::AllToAll
                        | CollectiveKind::AllToAllV
                        | CollectiveKind::AllToAllRank => &[P::Dispatch, P::Combine],
                    };
                    (phases, "a collective of this kind".to_string())
                }
                OpKind::Record { .. } | OpKind::Wait { .. } => continue,
            };
            if !allowed.contains(&op.phase) {
                let names: Vec<&str> = allowed.iter().map(|p| p.name()).collect();
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "is in the {} phase, but {what} belongs to {}",
                        op.phase.name(),
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(" or ")
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Collectives over the right peers: the exchanges of the routing over
    /// the whole EP group; the legs of a hierarchical all-to-all (between
    /// nodes, inside a node) only in a hierarchical plan whose EP group spans
    /// nodes (a flat plan's all-to-all given a leg's scope would run the
    /// leg's routing on rows laid out for the whole group).
    fn check_collective_forms(&self) -> Result<(), PlanError> {
        use super::{A2aAlgorithm, CollectiveScope as S};
        let group = self.mesh.ep.saturating_mul(self.mesh.etp);
        let multi_node = group > self.mesh.gpus_per_node;
        let hierarchical = self.choices.dispatch == A2aAlgorithm::Hierarchical && multi_node;
        for (s, op) in self.ops() {
            let OpKind::Collective { kind, scope, .. } = op.kind else {
                continue;
            };
            let metadata = matches!(
                kind,
                CollectiveKind::CountExchange | CollectiveKind::AllGather
            );
            if scope == S::EpGroup || (hierarchical && !metadata) {
                continue;
            }
            return Err(op_error(
                self,
                s,
                op,
                if metadata {
                    "exchanges routing metadata over part of the EP group; its scope must be `ep_group`".to_string()
                } else {
                    format!(
                        "runs a hierarchical leg ({scope:?}), but the plan's dispatch is {} over an EP group of {group} ranks on nodes of {}",
                        if self.choices.dispatch == A2aAlgorithm::Hierarchical { "hierarchical" } else { "flat" },
                        self.mesh.gpus_per_node
                    )
                },
            ));
        }
        Ok(())
    }
}

impl Plan {
    /// Every all-to-all moves rows the way its phase says: the runtime lays
    /// out a dispatch from the token side to the expert side and a combine
    /// back, by the phase. So the rows a dispatch sends were written before
    /// it left the token side (by the permute phase, or by the dispatch's
    /// previous leg), and the rows a combine sends by the experts (the
    /// expert GEMMs, the reduction before the return trip, or the combine's
    /// previous leg). A collective whose phase was changed would move the
    /// right bytes the wrong way; it is refused here.
    fn check_collective_directions(&self) -> Result<(), PlanError> {
        use Phase as P;
        let mut writers: Vec<Vec<Phase>> = vec![Vec::new(); self.buffers.len()];
        for (_, op) in self.ops() {
            for b in op.kind.writes() {
                if let Some(w) = writers.get_mut(b as usize) {
                    w.push(op.phase);
                }
            }
        }
        for (s, op) in self.ops() {
            let OpKind::Collective { kind, send, .. } = op.kind else {
                continue;
            };
            let allowed: &[Phase] = match (kind, op.phase) {
                (CollectiveKind::CountExchange | CollectiveKind::AllGather, _) => continue,
                (_, P::Dispatch) => &[P::Permute, P::Dispatch],
                (_, P::Combine) => &[P::Experts, P::Unpermute, P::Combine],
                _ => continue, // reported by the phase check
            };
            let Some(w) = writers.get(send as usize) else {
                continue; // reported by the reference checks
            };
            if let Some(bad) = w.iter().find(|p| !allowed.contains(p)) {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "is a {} but sends rows written in the {} phase (a {} sends what {} wrote)",
                        op.phase.name(),
                        bad.name(),
                        op.phase.name(),
                        allowed
                            .iter()
                            .map(|p| p.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn is_router(k: KernelKind) -> bool {
    matches!(
        k,
        KernelKind::RouterFused
            | KernelKind::RouterScores
            | KernelKind::RouterBias
            | KernelKind::RouterGroupSelect
            | KernelKind::RouterTopk
            | KernelKind::RouterNormalize
            | KernelKind::RouterScale
    )
}

/// The router's stages as separate kernels, in the order the layer applies
/// them: scores, the selection bias, group selection, top-k, normalisation,
/// scaling (the last two only when they change the weights).
pub fn router_chain(r: &super::RouterConfig) -> Vec<KernelKind> {
    let mut chain = vec![KernelKind::RouterScores];
    if r.selection_bias {
        chain.push(KernelKind::RouterBias);
    }
    if r.groups.is_some() {
        chain.push(KernelKind::RouterGroupSelect);
    }
    chain.push(KernelKind::RouterTopk);
    if r.normalize {
        chain.push(KernelKind::RouterNormalize);
    }
    if r.scale != 1.0 {
        chain.push(KernelKind::RouterScale);
    }
    chain
}
