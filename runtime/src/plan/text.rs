//! The text form of a plan (what `moec build` prints and the snapshots hold).
//!
//! Stable and diff-friendly: one item per line, no hash-order iteration,
//! floats with fixed decimals (estimates in us with two decimals, sizes as
//! exact bytes plus a binary-prefixed form). On op lines the fixed-width
//! columns (id, name, estimate, phase, chunk) come first and the description
//! last, so one long description does not realign every other line.
//!
//! Printing never panics, whatever the plan: an index out of range prints as
//! `b?17` (buffer), `k?3` (kernel) or `e?9` (event).

use super::{
    A2aAlgorithm, Activation, CapacityConfig, DropPolicy, Epilogue, OpKind, Plan, Scoring,
    SoftmaxOver, WeightOn,
};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// Names longer than this do not widen their column.
const MAX_COLUMN: usize = 32;
/// Width of the section labels (`layer`, `mesh`, ...).
const LABEL: usize = 9;
/// EP ranks listed one per line before the list is shortened.
const MAX_RANK_LINES: usize = 16;
/// Expert ranges shown for one EP rank before the list is shortened.
const MAX_RANGES: usize = 24;

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "moec plan v{}: layer {}",
            self.version,
            clean(&self.layer.name)
        )?;
        section(f, "layer", &self.layer_lines())?;
        section(f, "mesh", &self.mesh_lines())?;
        section(f, "choices", &self.choice_lines())?;
        self.fmt_kernels(f)?;
        self.fmt_buffers(f)?;
        self.fmt_streams(f)?;
        section(f, "memory", &self.memory_lines())
    }
}

/// Writes `label` and the first line, then the rest indented under it.
fn section(f: &mut fmt::Formatter<'_>, label: &str, lines: &[String]) -> fmt::Result {
    for (i, line) in lines.iter().enumerate() {
        let label = if i == 0 { label } else { "" };
        writeln!(f, "{label:<LABEL$}{line}")?;
    }
    Ok(())
}

/// `56.00 MiB`: two decimals and a binary prefix; plain bytes below 1 KiB.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64;
    let mut unit = 0;
    // 1023.996 KiB prints as 1.00 MiB, not 1024.00 KiB.
    while v >= 1024.0 - 0.005 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

/// `160 GB/s`, `3.35 TB/s`, `989 TFLOP/s`: SI prefixes, up to three decimals.
pub fn human_rate(v: f64, unit: &str) -> String {
    const PREFIXES: [(f64, &str); 5] =
        [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    if !v.is_finite() {
        return format!("{v} {unit}");
    }
    for (scale, prefix) in PREFIXES {
        if v.abs() >= scale {
            return format!("{} {prefix}{unit}", trim_float(v / scale));
        }
    }
    format!("{} {unit}", trim_float(v))
}

/// Up to three decimals, no trailing zeros: `2.5`, `3`, `0.125`.
fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    if s.contains('.') {
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_string()
        } else {
            s.to_string()
        }
    } else {
        s
    }
}

/// Seconds as microseconds: `3 us`, `0.5 us`.
fn micros(seconds: f64) -> String {
    format!("{} us", trim_float(seconds * 1e6))
}

/// A name as printed: as is, or quoted and escaped when it is empty or holds
/// control characters (a newline must not break the one-item-per-line layout).
fn clean(name: &str) -> Cow<'_, str> {
    if name.is_empty() || name.chars().any(char::is_control) {
        Cow::Owned(format!("{name:?}"))
    } else {
        Cow::Borrowed(name)
    }
}

/// The snake_case name serde gives a unit enum variant.
fn snake<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_string(),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Column width: the widest item, capped so one long name does not widen all lines.
fn width<'a>(items: impl Iterator<Item = &'a String>) -> usize {
    items
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0)
        .min(MAX_COLUMN)
}

fn ffn_text(ffn: Activation, intermediate: u64, bias: bool) -> String {
    let mut s = match ffn {
        Activation::Swiglu { limit: Some(limit) } => {
            format!("swiglu({intermediate}, limit {})", trim_float(limit))
        }
        _ => format!("{}({intermediate})", ffn.name()),
    };
    if bias {
        s.push_str(" with biases");
    }
    s
}

/// `[0, 1, 2, 5, 7, 8]` -> `0-2, 5, 7-8`, in the order given; at most
/// [`MAX_RANGES`] ranges, then how many more.
fn ranges(items: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut more = 0usize;
    let mut i = 0;
    while i < items.len() {
        let start = items[i];
        let mut j = i;
        while j + 1 < items.len() && items[j].checked_add(1) == Some(items[j + 1]) {
            j += 1;
        }
        if out.len() < MAX_RANGES {
            out.push(if j == i {
                start.to_string()
            } else {
                format!("{start}-{}", items[j])
            });
        } else {
            more += 1;
        }
        i = j + 1;
    }
    if out.is_empty() {
        return "none".to_string();
    }
    let mut s = out.join(", ");
    if more > 0 {
        s.push_str(&format!(", ... ({more} more ranges)"));
    }
    s
}

/// The experts of each EP rank, compactly: regular placements in one line,
/// others one rank per line (shortened past [`MAX_RANK_LINES`] ranks).
fn placement_lines(ranks: &[Vec<u64>]) -> Vec<String> {
    if ranks.is_empty() {
        return vec!["experts per EP rank: none listed".to_string()];
    }
    let n = ranks[0].len();
    let uniform = ranks.iter().all(|r| r.len() == n);
    let ep = ranks.len() as u64;
    let contiguous = uniform
        && ranks.iter().enumerate().all(|(r, list)| {
            let start = (r as u64).saturating_mul(n as u64);
            list.iter()
                .enumerate()
                .all(|(i, &e)| Some(e) == start.checked_add(i as u64))
        });
    let round_robin = !contiguous
        && uniform
        && ranks.iter().enumerate().all(|(r, list)| {
            list.iter().enumerate().all(|(i, &e)| {
                Some(e)
                    == (i as u64)
                        .checked_mul(ep)
                        .and_then(|x| x.checked_add(r as u64))
            })
        });
    let rank_text = |r: usize| format!("rank {r}: {}", ranges(&ranks[r]));
    if contiguous || round_robin {
        let kind = if contiguous {
            "contiguous"
        } else {
            "round-robin"
        };
        let last = ranks.len() - 1;
        let shown: Vec<String> = if ranks.len() <= 3 {
            (0..ranks.len()).map(rank_text).collect()
        } else {
            vec![
                rank_text(0),
                rank_text(1),
                "...".to_string(),
                rank_text(last),
            ]
        };
        return vec![format!(
            "experts per EP rank: {n}, {kind} ({})",
            shown.join("; ")
        )];
    }
    let min = ranks.iter().map(Vec::len).min().unwrap_or(0);
    let max = ranks.iter().map(Vec::len).max().unwrap_or(0);
    let count = if min == max {
        min.to_string()
    } else {
        format!("{min} to {max}")
    };
    let mut lines = vec![format!(
        "experts per EP rank: {count} (primary copies first, then replicas)"
    )];
    let w = (ranks.len() - 1).to_string().len();
    let line = |r: usize| format!("  ep rank {r:<w$}  {}", ranges(&ranks[r]));
    if ranks.len() <= MAX_RANK_LINES {
        lines.extend((0..ranks.len()).map(line));
        return lines;
    }
    // Too many to list: the first and last ranks, and the ranks whose count
    // differs from the most common one (where the replicas are).
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in ranks {
        *counts.entry(r.len()).or_default() += 1;
    }
    let common = counts
        .iter()
        .max_by_key(|&(len, count)| (*count, std::cmp::Reverse(*len)))
        .map_or(0, |(len, _)| *len);
    let mut shown: Vec<usize> = (0..4).collect();
    let odd = (4..ranks.len() - 2).filter(|&r| ranks[r].len() != common);
    shown.extend(odd.take(MAX_RANK_LINES - 6));
    shown.extend(ranks.len() - 2..ranks.len());
    let mut next = 0;
    for r in shown {
        if r > next {
            lines.push(format!(
                "  ... {}",
                plural((r - next) as u64, "more EP rank", "more EP ranks")
            ));
        }
        lines.push(line(r));
        next = r + 1;
    }
    lines
}

impl Plan {
    fn buffer_text(&self, index: u32) -> String {
        match self.buffers.get(index as usize) {
            Some(b) => format!("b{index} {}", clean(&b.name)),
            None => format!("b?{index}"),
        }
    }

    fn buffers_text(&self, list: &[u32]) -> String {
        if list.is_empty() {
            return "nothing".to_string();
        }
        let items: Vec<String> = list.iter().map(|&b| self.buffer_text(b)).collect();
        items.join(", ")
    }

    fn kernel_text(&self, index: u32) -> String {
        match self.kernels.get(index as usize) {
            Some(k) => format!("k{index} {}", clean(&k.name)),
            None => format!("k?{index}"),
        }
    }

    fn event_text(&self, event: u32) -> String {
        if event < self.events {
            format!("e{event}")
        } else {
            format!("e?{event}")
        }
    }

    fn stream_text(&self, stream: usize) -> String {
        match self.streams.get(stream) {
            Some(s) => format!("s{stream} {}", clean(&s.name)),
            None => format!("s?{stream}"),
        }
    }

    fn layer_lines(&self) -> Vec<String> {
        let l = &self.layer;
        let r = &l.router;
        let dispatch = if l.dispatch_dtype == l.dtype {
            String::new()
        } else {
            format!(" (dispatch in {})", l.dispatch_dtype.name())
        };
        let mut lines = vec![format!(
            "hidden {}, {}{dispatch}, {} tokens per rank",
            l.hidden,
            l.dtype.name(),
            l.tokens_per_rank
        )];
        lines.push(format!(
            "experts {} x {}",
            l.experts,
            ffn_text(l.ffn, l.intermediate, l.expert_bias)
        ));
        let mut router = format!(
            "router top-{} {}",
            r.top_k,
            match (r.scoring, r.softmax_over) {
                (Scoring::Sigmoid, _) => "sigmoid",
                (Scoring::Softmax, SoftmaxOver::All) => "softmax over all experts",
                (Scoring::Softmax, SoftmaxOver::Topk) => "softmax over the top-k",
            }
        );
        if r.logit_bias {
            router.push_str(" + logit bias");
        }
        if r.selection_bias {
            router.push_str(" + selection bias");
        }
        if let Some(g) = r.groups {
            router.push_str(&format!(
                ", groups {} of {} ({})",
                g.kept,
                g.count,
                snake(&g.score)
            ));
        }
        router.push_str(if r.normalize {
            ", normalised"
        } else {
            ", not normalised"
        });
        router.push_str(&format!(", scale {}", trim_float(r.scale)));
        router.push_str(match r.weight_on {
            WeightOn::Output => ", weight on output",
            WeightOn::Input => ", weight on input",
        });
        lines.push(router);
        lines.push(match &l.shared {
            None => "shared none".to_string(),
            Some(s) => format!(
                "shared {} x {}{}",
                s.count,
                ffn_text(s.ffn, s.intermediate, s.bias),
                if s.sigmoid_gate { ", sigmoid gate" } else { "" }
            ),
        });
        lines.push(match l.capacity {
            CapacityConfig::Dropless => "capacity dropless".to_string(),
            CapacityConfig::Limited {
                slots,
                factor,
                drop,
            } => format!(
                "capacity {slots} slots per expert per EP group{}, drop by {}",
                factor.map_or(String::new(), |x| format!(" (factor {})", trim_float(x))),
                match drop {
                    DropPolicy::Position => "position",
                    DropPolicy::Probs => "probs",
                }
            ),
        });
        lines
    }

    fn mesh_lines(&self) -> Vec<String> {
        let m = &self.mesh;
        let d = &m.device;
        let mut lines = vec![format!(
            "{} x {} {} = {} (ep {}, etp {}, dp {})",
            plural(m.nodes, "node", "nodes"),
            m.gpus_per_node,
            clean(&d.name),
            plural(m.world_size(), "rank", "ranks"),
            m.ep,
            m.etp,
            m.dp
        )];
        lines.push(format!(
            "{}: {}, {}, {} memory",
            clean(&d.name),
            human_rate(d.peak_flops, "FLOP/s"),
            human_rate(d.memory_bandwidth, "B/s"),
            human_rate(d.memory, "B")
        ));
        let intra = &m.intra_node;
        lines.push(format!(
            "intra-node {} {}; inter-node {}",
            human_rate(intra.bandwidth, "B/s"),
            micros(intra.latency),
            match &m.inter_node {
                Some(link) => format!(
                    "{} {}",
                    human_rate(link.bandwidth, "B/s"),
                    micros(link.latency)
                ),
                None => "none".to_string(),
            }
        ));
        lines.extend(placement_lines(&m.experts_of_ep_rank));
        lines
    }

    fn choice_lines(&self) -> Vec<String> {
        let c = &self.choices;
        let tokens = self.layer.tokens_per_rank;
        let mut chunks = format!(
            "{} of {} tokens",
            plural(c.chunks, "chunk", "chunks"),
            c.chunk_tokens
        );
        let last = c
            .chunks
            .checked_sub(1)
            .and_then(|n| n.checked_mul(c.chunk_tokens))
            .and_then(|before| tokens.checked_sub(before));
        if c.chunks > 1 {
            if let Some(last) = last.filter(|&last| last != c.chunk_tokens) {
                chunks.push_str(&format!(" (last {last})"));
            }
        } else {
            chunks.push_str(" (no overlap)");
        }
        let mut lines = vec![chunks];
        let fusions = [
            (c.fused_router, "router"),
            (c.fused_permute, "permute into the pack"),
            (c.fused_combine, "un-permute into the combine"),
            (c.fused_activation, "activation into the GEMM epilogue"),
        ];
        let fused: Vec<&str> = fusions.iter().filter(|x| x.0).map(|x| x.1).collect();
        let unfused: Vec<&str> = fusions.iter().filter(|x| !x.0).map(|x| x.1).collect();
        let mut fusion = format!(
            "fused: {}",
            if fused.is_empty() {
                "nothing".to_string()
            } else {
                fused.join(", ")
            }
        );
        if !unfused.is_empty() {
            fusion.push_str(&format!("; not fused: {}", unfused.join(", ")));
        }
        lines.push(fusion);
        if self.layer.shared.is_some() || c.shared_concurrent {
            lines.push(
                if c.shared_concurrent {
                    "shared experts run concurrently with the dispatch"
                } else {
                    "shared experts run after the routed experts"
                }
                .to_string(),
            );
        }
        lines.push(format!(
            "dispatch {}{}, {} on the wire",
            match c.dispatch {
                A2aAlgorithm::Flat => "flat",
                A2aAlgorithm::Hierarchical => "hierarchical",
            },
            if c.dedup_dispatch {
                " by rank (one row per token and destination rank)"
            } else {
                ""
            },
            c.dispatch_dtype.name()
        ));
        if c.reduce_combine {
            lines.push(
                if c.dispatch == A2aAlgorithm::Hierarchical {
                    "combine reduced per rank, then per node, before the return trip"
                } else {
                    "combine reduced per rank before the return trip"
                }
                .to_string(),
            );
        }
        let why = match (&self.layer.capacity, c.headroom) {
            (CapacityConfig::Dropless, Some(h)) => format!(
                "dropless: {h}x the expected load; device overflow flag, \
                 a pass that needs more re-runs with grown buffers"
            ),
            (CapacityConfig::Dropless, None) if c.overflow_flag => {
                "dropless worst case; device overflow flag, no host sync".to_string()
            }
            (CapacityConfig::Dropless, None) => "dropless worst case; no overflow flag".to_string(),
            (CapacityConfig::Limited { .. }, _) if c.overflow_flag => {
                "capacity; device overflow flag".to_string()
            }
            (CapacityConfig::Limited { .. }, _) => "capacity".to_string(),
        };
        lines.push(format!(
            "expert rows {} per rank and chunk ({why})",
            c.expert_rows
        ));
        if c.dedup_dispatch {
            lines.push(format!(
                "by-rank rows {} received per rank and chunk",
                c.rank_rows
            ));
        }
        lines
    }

    fn fmt_kernels(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernels ({})", self.kernels.len())?;
        let rows: Vec<[String; 4]> = self
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let constants: Vec<String> = k
                    .constants
                    .iter()
                    .map(|(name, value)| format!("{}={value}", clean(name)))
                    .collect();
                [
                    format!("k{i}"),
                    clean(&k.name).into_owned(),
                    snake(&k.kind),
                    constants.join(" "),
                ]
            })
            .collect();
        let w0 = width(rows.iter().map(|r| &r[0]));
        let w1 = width(rows.iter().map(|r| &r[1]));
        let w2 = width(rows.iter().map(|r| &r[2]));
        for [index, name, kind, constants] in &rows {
            let line = format!("  {index:<w0$}  {name:<w1$}  {kind:<w2$}  {constants}");
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }

    fn fmt_buffers(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "buffers ({})", self.buffers.len())?;
        let rows: Vec<[String; 9]> = self
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let dims: Vec<String> = b.shape.iter().map(u64::to_string).collect();
                [
                    format!("b{i}"),
                    clean(&b.name).into_owned(),
                    b.dtype.name().to_string(),
                    format!("[{}]", dims.join(", ")),
                    format!("{} B", b.bytes),
                    if b.bytes < 1024 {
                        String::new()
                    } else {
                        format!("({})", human_bytes(b.bytes))
                    },
                    snake(&b.role),
                    format!("@{}", b.offset),
                    format!("ops {}..{}", b.live.0, b.live.1),
                ]
            })
            .collect();
        let w: Vec<usize> = (0..9).map(|c| width(rows.iter().map(|r| &r[c]))).collect();
        for r in &rows {
            let line = format!(
                "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:>w4$}  {:<w5$}  {:<w6$}  {:<w7$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4],
                w5 = w[5],
                w6 = w[6],
                w7 = w[7],
            );
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    fn fmt_streams(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "streams ({}), events ({})",
            self.streams.len(),
            self.events
        )?;
        // Who records and who waits for each event, for the cross-references.
        let mut records: BTreeMap<u32, Vec<(u32, usize)>> = BTreeMap::new();
        let mut waits: BTreeMap<u32, Vec<(u32, usize)>> = BTreeMap::new();
        for (s, op) in self.ops() {
            match op.kind {
                OpKind::Record { event } => records.entry(event).or_default().push((op.id, s)),
                OpKind::Wait { event } => waits.entry(event).or_default().push((op.id, s)),
                _ => {}
            }
        }
        let refs = |map: &BTreeMap<u32, Vec<(u32, usize)>>, event: u32| -> Option<String> {
            let list = map.get(&event)?;
            let items: Vec<String> = list
                .iter()
                .map(|&(id, s)| format!("#{id} on {}", self.stream_text(s)))
                .collect();
            Some(items.join(", "))
        };
        let id_width = width(
            self.ops()
                .map(|(_, op)| format!("#{}", op.id))
                .collect::<Vec<_>>()
                .iter(),
        );
        let name_width = width(
            self.ops()
                .map(|(_, op)| clean(&op.name).into_owned())
                .collect::<Vec<_>>()
                .iter(),
        );
        let estimates: Vec<String> = self
            .ops()
            .map(|(_, op)| format!("{:.2} us", op.estimate_us))
            .collect();
        let estimate_width = width(estimates.iter());
        let chunk_width = width(
            self.ops()
                .filter_map(|(_, op)| op.chunk.map(|c| format!("chunk {c}")))
                .collect::<Vec<_>>()
                .iter(),
        );
        let phase_width = super::Phase::ALL
            .iter()
            .map(|p| p.name().len())
            .max()
            .unwrap_or(0);
        for (s, stream) in self.streams.iter().enumerate() {
            let total: f64 = stream.ops.iter().map(|op| op.estimate_us).sum();
            writeln!(
                f,
                "  {}: {}, {}, {:.2} us",
                self.stream_text(s),
                snake(&stream.role),
                plural(stream.ops.len() as u64, "op", "ops"),
                total
            )?;
            for op in &stream.ops {
                let desc = match &op.kind {
                    OpKind::Launch {
                        kernel,
                        inputs,
                        outputs,
                        rows,
                    } => format!(
                        "launch {}: {} -> {}; {}",
                        self.kernel_text(*kernel),
                        self.buffers_text(inputs),
                        self.buffers_text(outputs),
                        plural(*rows, "row", "rows")
                    ),
                    OpKind::Gemm {
                        weight,
                        a,
                        c,
                        m,
                        n,
                        k,
                        groups,
                        epilogue,
                        by_rank,
                    } => {
                        let by_rank = match (by_rank, weight) {
                            (None, _) => String::new(),
                            (Some(r), super::GemmWeight::ExpertUp) => {
                                format!("; rows read through {}", self.buffer_text(r.index))
                            }
                            (Some(r), _) => format!(
                                "; outputs summed through {}, {}",
                                self.buffer_text(r.index),
                                self.buffer_text(r.weights)
                            ),
                        };
                        let groups = if *groups == 1 {
                            String::new()
                        } else {
                            format!("{groups} groups x ")
                        };
                        let epilogue = match epilogue {
                            Epilogue::None => "",
                            Epilogue::Activation => "; activation in the epilogue",
                        };
                        format!(
                            "gemm {}: {} -> {}; {groups}m {m}, n {n}, k {k}{epilogue}{by_rank}",
                            snake(weight),
                            self.buffer_text(*a),
                            self.buffer_text(*c)
                        )
                    }
                    OpKind::Collective {
                        kind,
                        scope,
                        send,
                        recv,
                        peers,
                        bytes_per_peer,
                        bytes_sent,
                    } => format!(
                        "{} over {}: {} -> {}; {}, {} each, {} sent",
                        snake(kind),
                        snake(scope),
                        self.buffer_text(*send),
                        self.buffer_text(*recv),
                        plural(*peers, "peer", "peers"),
                        human_bytes(*bytes_per_peer),
                        human_bytes(*bytes_sent)
                    ),
                    OpKind::Record { event } => format!(
                        "record {} ({})",
                        self.event_text(*event),
                        refs(&waits, *event)
                            .map_or("no waits".to_string(), |w| format!("waited by {w}"))
                    ),
                    OpKind::Wait { event } => format!(
                        "wait {} ({})",
                        self.event_text(*event),
                        refs(&records, *event)
                            .map_or("never recorded".to_string(), |r| format!("recorded by {r}"))
                    ),
                };
                let id = format!("#{}", op.id);
                let chunk = op.chunk.map_or(String::new(), |c| format!("chunk {c}"));
                let chunk = if chunk_width == 0 {
                    String::new()
                } else {
                    format!("{chunk:<chunk_width$}  ")
                };
                writeln!(
                    f,
                    "    {id:<id_width$}  {:<name_width$}  {:>estimate_width$}  {:<phase_width$}  {chunk}{desc}",
                    clean(&op.name),
                    format!("{:.2} us", op.estimate_us),
                    op.phase.name(),
                )?;
            }
        }
        Ok(())
    }

    fn memory_lines(&self) -> Vec<String> {
        let m = &self.memory;
        let rows = [
            (
                "arena",
                m.peak_activation_bytes,
                " per rank, the peak of live activations",
            ),
            ("without reuse", m.total_buffer_bytes, ""),
            ("weights", m.weight_bytes, " per rank"),
        ];
        let sizes: Vec<String> = rows.iter().map(|r| format!("{} B", r.1)).collect();
        let w = width(sizes.iter());
        rows.iter()
            .zip(&sizes)
            .map(|((label, bytes, note), size)| {
                let human = if *bytes < 1024 {
                    String::new()
                } else {
                    format!("  ({})", human_bytes(*bytes))
                };
                format!("{label:<13}  {size:>w$}{human}{note}")
            })
            .collect()
    }
}
