//! The rewrite rules. Each is targeted (it matches one shape of the MoE
//! dataflow, never general algebra such as commutativity) and guarded by the
//! model; the schedule section of the `.moe` file decides which families run.
//! Why each is sound is in the book's "Rewrites" chapter.

use crate::ir::{lower_body, MetaAnalysis, Model, MoeIr, RouterStage};
use egg::{rewrite, Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use moec_runtime::plan::{self as rt, DType};

pub type MoeRewrite = Rewrite<MoeIr, MetaAnalysis>;

/// The rule families, by the name the `.moe` schedule uses.
pub const FAMILIES: &[&str] = moec_lang::spec::RULES;

/// Which family a rule (by its egg name) belongs to.
pub fn family_of(rule: &str) -> &str {
    FAMILIES
        .iter()
        .find(|f| rule == **f || rule.starts_with(&format!("{f}/")))
        .copied()
        .unwrap_or(rule)
}

/// The rules allowed by `allowed` (family names), for this model, with the
/// overlap degrees `degrees` for `overlap_chunks`.
pub fn rules(model: &Model, allowed: &[&str], degrees: &[u64]) -> Result<Vec<MoeRewrite>, String> {
    let on = |f: &str| allowed.contains(&f);
    let mut rules = Vec::new();
    if on("fuse_router") && model.router_stages.len() > 1 {
        rules.push(fuse_router(model)?);
    }
    if on("fuse_permute") {
        rules.push(rewrite!("fuse_permute"; "(pack (permute ?x ?a))" => "(permute_pack ?x ?a)"));
    }
    if on("fuse_combine") {
        rules.push(rewrite!("fuse_combine";
            "(wsum (unpermute ?c ?a) ?a)" => "(unpermute_wsum ?c ?a)"));
    }
    if on("fuse_activation") {
        rules.push(rewrite!("fuse_activation/experts"; "(act (up ?r))" => "(up_act ?r)"));
        rules.push(rewrite!("fuse_activation/shared";
            "(shared_act (shared_up ?x))" => "(shared_up_act ?x)"));
    }
    if on("overlap_shared") && model.shared.is_some() {
        rules.push(rewrite!("overlap_shared"; "(add ?r ?s)" => "(add_par ?r ?s)"));
    }
    // The inter-node leg sends one copy of a token per destination node, so
    // every row of a token must be the same: not so when the router weight
    // scales each (token, expert) row on the input side with top_k > 1.
    let rows_of_a_token_equal =
        model.layer.router.weight_on == rt::WeightOn::Output || model.top_k == 1;
    if on("hierarchical_a2a")
        && model.group_nodes > 1
        && model.group_ranks_per_node > 1
        && rows_of_a_token_equal
    {
        rules.push(rewrite!("hierarchical_a2a/dispatch";
            "(dispatch ?p)" => "(dispatch_intra (dispatch_inter ?p))"));
        rules.push(rewrite!("hierarchical_a2a/combine";
            "(combine ?y ?a)" => "(combine_inter (combine_intra ?y ?a) ?a)"));
    }
    // By rank, the rows of a token are its unscaled row (the expert side
    // applies the weights), so the weight's side does not matter.
    if on("hierarchical_a2a") && model.group_nodes > 1 && model.group_ranks_per_node > 1 {
        rules.push(rewrite!("hierarchical_a2a/dispatch_rank";
            "(dispatch_rank ?p)" => "(dispatch_rank_intra (dispatch_rank_inter ?p))"));
        rules.push(rewrite!("hierarchical_a2a/combine_rank";
            "(combine_rank ?r)" => "(combine_rank_inter (combine_rank_intra ?r))"));
    }
    // Dispatch by rank and the reducing combine: see `by_rank_guard`. Both
    // match the unfused forms, which every lowered body keeps in its classes.
    let by_rank = by_rank_guard(model.ep, model.etp, model.top_k).is_none();
    if on("dedup_dispatch") && by_rank {
        rules.push(rewrite!("dedup_dispatch";
            "(dispatch (pack (permute ?x ?a)))" => "(expand (dispatch_rank (pack_rank ?x ?a)) ?a)"));
    }
    // The expansion fused into the up projection's operand load: it reads
    // each received row through the index. Not when the layer weighs the
    // inputs: every copy of a row is scaled by its pick's weight, so the
    // copies differ and the expansion stays a pass of its own.
    if on("dedup_dispatch") && by_rank && model.layer.router.weight_on == rt::WeightOn::Output {
        rules.push(rewrite!("dedup_dispatch/gather";
            "(up (expand ?r ?a))" => "(up (gather ?r ?a))"));
    }
    if on("reduce_combine") && by_rank {
        rules.push(rewrite!("reduce_combine";
            "(wsum (unpermute (combine ?y ?a) ?a) ?a)" => "(sum_rank (combine_rank (reduce ?y ?a)) ?a)"));
        // The reduction fused into the down projection's epilogue.
        rules.push(rewrite!("reduce_combine/epilogue";
            "(reduce (down ?u) ?a)" => "(down_reduce ?u ?a)"));
    }
    if on("fp8_dispatch") && model.fp8_dispatch_allowed && model.dtype != DType::Fp8E4m3 {
        rules.push(rewrite!("fp8_dispatch";
            "(dispatch ?p)" => "(dequant (dispatch (quant ?p)))"
            if not_fp8("?p")));
        rules.push(rewrite!("fp8_dispatch/by_rank";
            "(dispatch_rank ?p)" => "(dequant (dispatch_rank (quant ?p)))"
            if not_fp8("?p")));
    }
    if on("overlap_chunks") {
        for &d in degrees.iter().filter(|&&d| d > 1) {
            let name = format!("overlap_chunks/{d}");
            let searcher: Pattern<MoeIr> = "(pipeline 1 ?x ?a ?body)"
                .parse()
                .map_err(|e| format!("internal: bad pattern: {e}"))?;
            let applier = Chunk {
                degree: d,
                x: var("?x")?,
                a: var("?a")?,
            };
            rules
                .push(Rewrite::new(name, searcher, applier).map_err(|e| format!("internal: {e}"))?);
        }
    }
    Ok(rules)
}

/// Why dispatch by rank (and so the reducing combine, which reads the
/// picks that travel with it) cannot apply to this layer, or `None`.
///
/// Sound for every router variant: the picks' weights travel with the row,
/// so the expert side scales the rows (`weight_on = input`) or the outputs
/// (`weight_on = output`) per pick, exactly as the per-assignment path does;
/// capacity drops travel as picks marked absent; replicas are resolved per
/// source rank before the rows are formed; shared experts never travel.
pub fn by_rank_guard(ep: u64, etp: u64, top_k: u64) -> Option<String> {
    if ep <= 1 && etp <= 1 {
        return Some("one rank: nothing travels".into());
    }
    if etp > 1 {
        return Some(format!(
            "expert tensor parallelism (etp = {etp}) sends every row to each shard; dispatch by rank needs etp = 1"
        ));
    }
    if top_k <= 1 {
        return Some("top_k = 1: a token already travels once".into());
    }
    None
}

fn var(name: &str) -> Result<Var, String> {
    name.parse()
        .map_err(|e| format!("internal: bad variable {name}: {e:?}"))
}

/// `fuse_router`: the layer's exact chain of router stages, from scores to
/// the last stage, becomes one `router` kernel over the logits.
fn fuse_router(model: &Model) -> Result<MoeRewrite, String> {
    let mut lhs = "?l".to_string();
    for stage in &model.router_stages {
        lhs = format!("({} {lhs})", stage.node_name());
    }
    debug_assert!(model.router_stages.first() == Some(&RouterStage::Scores));
    let searcher: Pattern<MoeIr> = lhs.parse().map_err(|e| format!("internal: {e}"))?;
    let applier: Pattern<MoeIr> = "(router ?l)"
        .parse()
        .map_err(|e| format!("internal: {e}"))?;
    Rewrite::new("fuse_router", searcher, applier).map_err(|e| format!("internal: {e}"))
}

/// Guard: the value bound to `v` is not already fp8 (so the rule cannot stack).
fn not_fp8(v: &str) -> impl Fn(&mut EGraph<MoeIr, MetaAnalysis>, Id, &Subst) -> bool {
    let v: Var = v.parse().unwrap_or_else(|_| Var::from(Symbol::from("?p")));
    move |egraph, _, subst| egraph[subst[v]].data.dtype != DType::Fp8E4m3
}

/// `overlap_chunks/d`: the routed part over all tokens equals `d` chunks of
/// it, each over `split(d, x)` and `split(d, a)`. The chunk body is lowered
/// afresh (unfused, flat); the other rules then rewrite it like the original.
struct Chunk {
    degree: u64,
    x: Var,
    a: Var,
}

impl Applier<MoeIr, MetaAnalysis> for Chunk {
    fn apply_one(
        &self,
        egraph: &mut EGraph<MoeIr, MetaAnalysis>,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<MoeIr>>,
        rule_name: Symbol,
    ) -> Vec<Id> {
        let model = egraph.analysis.model.clone();
        let (x, a) = (subst[self.x], subst[self.a]);
        let d = egraph.add(MoeIr::Num(self.degree));
        let xs = egraph.add(MoeIr::Split([d, x]));
        let as_ = egraph.add(MoeIr::Split([d, a]));
        let body = lower_body(egraph, &model, xs, as_);
        let pipeline = egraph.add(MoeIr::Pipeline([d, x, a, body]));
        if egraph.union_trusted(eclass, pipeline, rule_name) {
            vec![pipeline]
        } else {
            vec![]
        }
    }
}
