//! Writing the `.moe` text of an imported layer.

use super::mesh::{choose_ep, MeshPlan};
use super::model::*;
use super::ImportOptions;

/// Text safe to put in a `//` comment: one line, no control characters.
pub(super) fn clean_comment(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Writes `.moe` text in the style of `examples/`: four-space indentation,
/// one entry per line, comments wrapped at 80 columns.
#[derive(Default)]
pub(super) struct Out {
    pub(super) text: String,
    pub(super) depth: usize,
}

pub(super) const WIDTH: usize = 80;

impl Out {
    pub(super) fn indent(&self) -> String {
        "    ".repeat(self.depth)
    }

    /// A `//` comment of one or more lines, wrapped at [`WIDTH`].
    pub(super) fn comment(&mut self, text: &str) {
        let indent = self.indent();
        let room = WIDTH.saturating_sub(indent.len() + 3).max(20);
        let mut line = String::new();
        for word in clean_comment(text).split_whitespace() {
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > room {
                self.text.push_str(&format!("{indent}// {line}\n"));
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            self.text.push_str(&format!("{indent}// {line}\n"));
        }
    }

    pub(super) fn comments(&mut self, lines: &[String]) {
        for l in lines {
            self.comment(l);
        }
    }

    pub(super) fn entry(&mut self, key: &str, value: &str, note: Option<&str>) {
        let indent = self.indent();
        match note
            .map(clean_comment)
            .filter(|n| !n.is_empty() && n != key)
        {
            Some(n) => self
                .text
                .push_str(&format!("{indent}{key} = {value} // {n}\n")),
            None => self.text.push_str(&format!("{indent}{key} = {value}\n")),
        }
    }

    pub(super) fn int(&mut self, key: &str, v: &Noted<u64>) {
        self.entry(key, &v.value.to_string(), v.note.as_deref());
    }

    pub(super) fn word(&mut self, key: &str, v: &Noted<&str>) {
        self.entry(key, v.value, v.note.as_deref());
    }

    pub(super) fn boolean(&mut self, key: &str, v: &Noted<bool>) {
        self.entry(
            key,
            if v.value { "true" } else { "false" },
            v.note.as_deref(),
        );
    }

    pub(super) fn float(&mut self, key: &str, v: &Noted<f64>) {
        self.entry(key, &decimal(v.value), v.note.as_deref());
    }

    pub(super) fn open(&mut self, head: &str) {
        let indent = self.indent();
        self.text.push_str(&format!("{indent}{head} {{\n"));
        self.depth += 1;
    }

    pub(super) fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        let indent = self.indent();
        self.text.push_str(&format!("{indent}}}\n"));
    }

    pub(super) fn blank(&mut self) {
        self.text.push('\n');
    }
}

/// A number for a comment: `7` rather than `7.0`.
pub(super) fn short_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        decimal(x)
    }
}

/// A finite number as a `.moe` decimal literal: `7.0`, `2.5`, `1e-5`.
pub(super) fn decimal(x: f64) -> String {
    format!("{x:?}")
}

/// Refuses layers beyond what the checker accepts, with a sentence rather than diagnostics.
pub(super) fn check_limits(m: &Model, plan: &MeshPlan) -> Result<(), String> {
    let max_experts = crate::check::MAX_EXPERTS;
    let max_ranks = crate::check::MAX_RANKS;
    let count = &m.experts.count;
    if count.value > max_experts {
        return Err(format!(
            "the model has {} experts (`{}`); moec supports at most {max_experts}.",
            count.value,
            count.note.as_deref().unwrap_or("experts")
        ));
    }
    if plan.world > max_ranks {
        return Err(format!(
            "a mesh of {} GPUs is larger than the {max_ranks} moec supports.",
            plan.world
        ));
    }
    let bytes = match plan.dtype {
        "f32" => 4,
        _ => 2,
    };
    let (hidden, inter, top_k) = (
        m.hidden.value,
        m.experts.intermediate.value,
        m.router.top_k.value,
    );
    let matrices: u64 = if m.experts.ffn.value == "swiglu" {
        3
    } else {
        2
    };
    let activations = plan
        .tokens_per_rank
        .checked_mul(hidden)
        .and_then(|x| x.checked_mul(top_k))
        .and_then(|x| x.checked_mul(bytes))
        .and_then(|x| x.checked_mul(plan.world));
    let weights = matrices
        .checked_mul(hidden)
        .and_then(|x| x.checked_mul(inter))
        .and_then(|x| x.checked_add(matrices.checked_mul(inter)?.checked_add(hidden)?))
        .and_then(|x| x.checked_mul(bytes))
        .and_then(|x| x.checked_mul(count.value));
    let shared = m.shared.as_ref().map_or(Some(0), |s| {
        matrices
            .checked_mul(hidden)
            .and_then(|x| x.checked_mul(s.intermediate.value))
            .and_then(|x| x.checked_mul(s.count.value))
            .and_then(|x| x.checked_mul(bytes))
    });
    if activations.is_none() || weights.is_none() || shared.is_none() {
        return Err(format!(
            "the layer is too large for moec: with hidden = {hidden}, intermediate = {inter}, \
             {} experts and {} tokens per rank, its byte counts overflow 64 bits.",
            count.value, plan.tokens_per_rank
        ));
    }
    Ok(())
}

pub(super) fn render(
    m: &Model,
    plan: &MeshPlan,
    options: &ImportOptions,
) -> Result<String, String> {
    check_limits(m, plan)?;
    let experts = m.experts.count.value;
    let ep = choose_ep(options.ep, plan.world, experts)?;
    let dp = plan.world / ep;
    let per_rank = experts / ep;

    let mut out = Out::default();
    let source = clean_comment(&options.source_name);
    out.comment(&format!(
        "Imported by `moec import` from {}: {}.",
        if source.is_empty() {
            "a config.json".to_string()
        } else {
            source
        },
        m.title
    ));
    out.comments(&m.about);
    out.comment(&format!(
        "Mesh: {} of {} {}s, expert parallelism {ep}{}.",
        plural(plan.nodes, "node", "nodes"),
        plan.gpus_per_node,
        plan.device,
        if dp > 1 {
            format!(" and data parallelism {dp}")
        } else {
            String::new()
        }
    ));
    out.blank();

    out.open(&format!("layer {}", m.name));
    out.int("hidden", &m.hidden);
    out.entry("dtype", plan.dtype, None);
    out.entry("tokens_per_rank", &plan.tokens_per_rank.to_string(), None);

    let e = &m.experts;
    out.blank();
    out.comments(&e.comment);
    out.open("experts");
    out.int("count", &e.count);
    out.word("ffn", &e.ffn);
    out.int("intermediate", &e.intermediate);
    if e.bias {
        out.entry("bias", "true", None);
    }
    if let Some(limit) = &e.swiglu_limit {
        out.float("swiglu_limit", limit);
    }
    out.close();

    if let Some(s) = &m.shared {
        out.blank();
        out.comments(&s.comment);
        out.open("shared_experts");
        out.int("count", &s.count);
        out.int("intermediate", &s.intermediate);
        if s.sigmoid_gate {
            out.entry("gate", "sigmoid", None);
        }
        out.close();
    }

    let r = &m.router;
    out.blank();
    out.comments(&r.comment);
    out.open("router");
    out.word("scoring", &r.scoring);
    out.int("top_k", &r.top_k);
    if let Some(b) = &r.logit_bias {
        out.boolean("logit_bias", b);
    }
    if let Some(over) = r.softmax_over {
        out.entry("softmax_over", over, None);
    }
    if let Some(b) = &r.selection_bias {
        out.boolean("selection_bias", b);
    }
    if let Some(g) = &r.groups {
        out.int("groups", &g.count);
        out.int("groups_kept", &g.kept);
        out.entry("group_score", g.score, None);
    }
    if let Some(n) = &r.normalize {
        out.boolean("normalize", n);
    }
    if let Some(s) = &r.scale {
        out.float("scale", s);
    }
    if r.weight_on_input {
        out.entry("weight_on", "input", None);
    }
    out.close();

    out.blank();
    match &m.capacity {
        CapacityOut::Dropless => out.entry("capacity", "dropless", None),
        CapacityOut::Slots(n) => {
            out.comment(
                "Tokens beyond an expert's capacity are dropped and pass through on the residual.",
            );
            out.open("capacity");
            out.int("slots", n);
            out.entry("drop", "position", None);
            out.close();
        }
        CapacityOut::Factor(f) => {
            out.comment(
                "Tokens beyond an expert's capacity are dropped and pass through on the residual.",
            );
            out.open("capacity");
            out.float("factor", f);
            out.entry("drop", "position", None);
            out.close();
        }
    }
    out.close();

    out.blank();
    out.open("mesh");
    out.entry("nodes", &plan.nodes.to_string(), None);
    out.entry("gpus_per_node", &plan.gpus_per_node.to_string(), None);
    out.entry("device", plan.device, None);
    if plan.nodes > 1 {
        out.open("inter_node");
        out.entry(
            "bandwidth",
            "400 Gb/s",
            Some("one ConnectX-7 NDR NIC per GPU"),
        );
        out.entry("latency", "10 us", None);
        out.close();
    }
    let ep_note = format!("{} per GPU", plural(per_rank, "expert", "experts"));
    out.entry("ep", &ep.to_string(), Some(&ep_note));
    if dp > 1 {
        out.entry(
            "dp",
            &dp.to_string(),
            Some(&format!("{dp} copies of each expert")),
        );
    }
    out.close();
    Ok(out.text)
}

pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}
