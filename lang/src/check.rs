//! Semantic checks: the generic syntax tree becomes a validated [`Program`],
//! or a list of every problem in the file.
//!
//! The checker keeps going after an error wherever it can, so one run reports
//! all the errors of a file. A field that fails its check is left out of the
//! program and the checks that need it are skipped, so one mistake gives one
//! diagnostic rather than a cascade.

use crate::ast::{
    Block, Entry, EntryBody, ExprKind, File, Item, KeyKind, Section, Value, ValueKind,
};
use crate::diag::Diagnostic;
use crate::eval::{eval_with_unit, int_literal, Constants, Dim, Val};
use crate::span::Span;
use crate::spec::*;
use std::collections::BTreeMap;

/// Checks a parsed file. Returns the program when there is no error, and every
/// diagnostic (warnings included) either way.
pub fn check(file: &File) -> (Option<(Program, Derived)>, Vec<Diagnostic>) {
    let mut ck = Checker::default();
    let result = ck.file(file);
    let mut diags = ck.diags;
    diags.sort_by_key(|d| (d.span.start, d.span.end));
    let program = if diags.iter().any(Diagnostic::is_error) {
        None
    } else {
        result
    };
    (program, diags)
}

/// The closest of `candidates` to `name`, if one is close enough to be a typo.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&name.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Every keyword that may appear as a value; constants may not shadow them.
pub const KEYWORDS: &[&str] = &[
    "f32",
    "bf16",
    "f16",
    "fp8_e4m3",
    "swiglu",
    "gelu",
    "gelu_tanh",
    "relu",
    "softmax",
    "sigmoid",
    "all",
    "topk",
    "top2_sum",
    "max",
    "output",
    "input",
    "dropless",
    "position",
    "probs",
    "contiguous",
    "round_robin",
    "explicit",
    "auto",
    "none",
    "custom",
    "H100",
    "H200",
    "H800",
    "A100",
    "B200",
];

struct DevicePreset {
    name: &'static str,
    peak_flops: f64,
    memory_bandwidth: f64,
    memory: f64,
    nvlink: f64,
}

/// The device presets' names, in the order the book lists them.
pub(crate) fn device_names() -> impl Iterator<Item = &'static str> {
    DEVICES.iter().map(|d| d.name)
}

/// Vendor datasheet figures (dense bf16, HBM, NVLink per direction); a mesh can override each.
const DEVICES: &[DevicePreset] = &[
    DevicePreset {
        name: "H100",
        peak_flops: 989e12,
        memory_bandwidth: 3.35e12,
        memory: 80e9,
        nvlink: 450e9,
    },
    DevicePreset {
        name: "H200",
        peak_flops: 989e12,
        memory_bandwidth: 4.8e12,
        memory: 141e9,
        nvlink: 450e9,
    },
    DevicePreset {
        name: "H800",
        peak_flops: 989e12,
        memory_bandwidth: 3.35e12,
        memory: 80e9,
        nvlink: 160e9,
    },
    DevicePreset {
        name: "A100",
        peak_flops: 312e12,
        memory_bandwidth: 2.039e12,
        memory: 80e9,
        nvlink: 300e9,
    },
    DevicePreset {
        name: "B200",
        peak_flops: 2250e12,
        memory_bandwidth: 8e12,
        memory: 192e9,
        nvlink: 900e9,
    },
];

/// Most routed experts a layer may have (real models use up to 256).
pub const MAX_EXPERTS: u64 = 1 << 16;
/// Most ranks a mesh may have; bounds every per-rank table the compiler builds.
pub const MAX_RANKS: u64 = 1 << 20;

/// Default per-message latencies when a link block gives none.
const DEFAULT_INTRA_LATENCY: f64 = 3e-6;
const DEFAULT_INTER_LATENCY: f64 = 10e-6;

#[derive(Default)]
struct Checker {
    diags: Vec<Diagnostic>,
    consts: Constants,
    /// Names of every `let` in the file, to tell "used before defined" from "unknown".
    all_lets: BTreeMap<String, Span>,
    /// Constants whose definition failed: their uses are not reported again.
    poisoned: std::collections::BTreeSet<String>,
    /// Only constants defined before this offset are visible (the start of the
    /// section being checked): a constant is defined before its first use.
    scope_end: usize,
    /// The constants visible at `scope_end`, built once per section (copying
    /// them for every expression made a file of `N` lets take `N²` time).
    visible: Option<(usize, Constants)>,
}

/// The entries of one block by name, after duplicates and unknown names were reported.
struct Fields<'a> {
    owner: String,
    /// Where to point when a required field is missing.
    owner_span: Span,
    by_name: BTreeMap<String, &'a Entry>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Entry> {
        self.by_name.get(name).copied()
    }
}

/// Spans the cross-field checks point at.
#[derive(Default)]
struct LayerSpans {
    tokens: Span,
    intermediate: Span,
    experts_count: Span,
    /// The expert count when it was valid, even if another experts field was not.
    experts_count_value: Option<u64>,
    dispatch_dtype: Option<Span>,
}

impl Checker {
    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn file(&mut self, file: &File) -> Option<(Program, Derived)> {
        self.scope_end = usize::MAX;
        for item in &file.items {
            if let Item::Let(l) = item {
                self.all_lets
                    .entry(l.name.name.clone())
                    .or_insert(l.name.span);
            }
        }
        let mut layer_section: Option<&Section> = None;
        let mut mesh_section: Option<&Section> = None;
        let mut schedule_section: Option<&Section> = None;
        for item in &file.items {
            match item {
                Item::Let(l) => self.define(l),
                Item::Section(s) => {
                    let slot = match s.kind.name.as_str() {
                        "layer" => &mut layer_section,
                        "mesh" => &mut mesh_section,
                        "schedule" => &mut schedule_section,
                        other => {
                            let mut d = Diagnostic::error(
                                "E0101",
                                s.kind.span,
                                format!("unknown section `{other}`"),
                            )
                            .label("not a section")
                            .note("a file has a `layer NAME { ... }`, a `mesh { ... }` and an optional `schedule { ... }`");
                            if let Some(m) = suggest(other, ["layer", "mesh", "schedule"]) {
                                d = d.help(format!("did you mean `{m}`?"));
                            }
                            self.err(d);
                            continue;
                        }
                    };
                    if let Some(first) = slot {
                        let d = Diagnostic::error(
                            "E0102",
                            s.kind.span,
                            format!("a second `{}` section", s.kind.name),
                        )
                        .label("defined again here")
                        .secondary(first.kind.span, "first defined here")
                        .note("a file describes one layer on one mesh");
                        self.err(d);
                    } else {
                        *slot = Some(s);
                    }
                }
            }
        }
        let end = file.items.last().map(|i| i.span().end).unwrap_or(0);
        let file_span = Span::new(0, end.min(1));
        let layer = match layer_section {
            Some(s) => {
                self.scope_end = s.span.start;
                self.layer(s)
            }
            None => {
                self.err(
                    Diagnostic::error("E0103", file_span, "no `layer` section in this file")
                        .label("the file starts here")
                        .help("add `layer NAME { hidden = ... experts { ... } router { ... } }`"),
                );
                None
            }
        };
        let mesh = match mesh_section {
            Some(s) => {
                self.scope_end = s.span.start;
                self.mesh(s, layer.as_ref().map(|(l, _)| l))
            }
            None => {
                self.err(
                    Diagnostic::error("E0103", file_span, "no `mesh` section in this file")
                        .label("the file starts here")
                        .help("add `mesh { gpus_per_node = 8 device = H100 ep = 8 }`"),
                );
                None
            }
        };
        let schedule = match schedule_section {
            Some(s) => {
                self.scope_end = s.span.start;
                self.schedule(s, layer.as_ref())
            }
            None => Some(Schedule::default()),
        };
        let ((layer, spans), mesh, schedule) = (layer?, mesh?, schedule?);
        let derived = self.derive(&layer, &mesh, &spans)?;
        Some((
            Program {
                layer,
                mesh,
                schedule,
            },
            derived,
        ))
    }

    fn define(&mut self, l: &crate::ast::Let) {
        let name = &l.name.name;
        if KEYWORDS.contains(&name.as_str()) || crate::spec::RULES.contains(&name.as_str()) {
            self.err(
                Diagnostic::error(
                    "E0106",
                    l.name.span,
                    format!("`{name}` is a keyword value and cannot name a constant"),
                )
                .label("reserved")
                .help(format!("choose another name, e.g. `{name}_value`")),
            );
            self.poisoned.insert(name.clone());
            return;
        }
        if let Some((_, first)) = self.consts.get(name) {
            let first = *first;
            self.err(
                Diagnostic::error(
                    "E0102",
                    l.name.span,
                    format!("constant `{name}` is defined twice"),
                )
                .label("defined again here")
                .secondary(first, "first defined here"),
            );
            return;
        }
        let ValueKind::Expr { expr, unit } = &l.value.kind else {
            self.err(
                Diagnostic::error(
                    "E0201",
                    l.value.span,
                    "a constant must be a number, a quantity, a boolean or a string",
                )
                .label("not a plain value"),
            );
            return;
        };
        match self.eval(expr, unit.as_ref()) {
            Some(v) => {
                self.consts.insert(name.clone(), (v, l.name.span));
            }
            None => {
                // Its error is reported; its uses are not reported again.
                self.poisoned.insert(name.clone());
            }
        }
    }

    fn eval(&mut self, expr: &crate::ast::Expr, unit: Option<&crate::ast::Unit>) -> Option<Val> {
        // Between sections every constant so far is visible (they are defined
        // in order); inside a section, the ones before it.
        let result = if self.scope_end == usize::MAX {
            eval_with_unit(expr, unit, &self.consts)
        } else {
            if self
                .visible
                .as_ref()
                .is_none_or(|(end, _)| *end != self.scope_end)
            {
                let end = self.scope_end;
                let visible: Constants = self
                    .consts
                    .iter()
                    .filter(|(_, (_, at))| at.start < end)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                self.visible = Some((end, visible));
            }
            let visible = self.visible.as_ref().map(|(_, v)| v);
            eval_with_unit(expr, unit, visible.unwrap_or(&self.consts))
        };
        match result {
            Ok(v) => Some(v),
            Err(mut d) => {
                if d.code == "E0105" {
                    let name = d
                        .message
                        .trim_start_matches("unknown constant `")
                        .trim_end_matches('`')
                        .to_string();
                    if self.poisoned.contains(&name) {
                        return None;
                    }
                    // Tell "defined later" and "defined in terms of itself" apart
                    // from "not defined at all".
                    if let Some(def) = self.all_lets.get(&name) {
                        d = if def.start < d.span.start && !self.consts.contains_key(&name) {
                            Diagnostic::error(
                                "E0105",
                                d.span,
                                format!("constant `{name}` is defined in terms of itself"),
                            )
                            .label("used in its own definition")
                            .secondary(*def, "defined here")
                        } else {
                            Diagnostic::error(
                                "E0105",
                                d.span,
                                format!("constant `{name}` is used before it is defined"),
                            )
                            .label("used here")
                            .secondary(*def, "defined later here")
                            .help("move the `let` above its first use")
                        };
                    }
                }
                self.err(d);
                None
            }
        }
    }

    /// Collects a block's entries by name; reports duplicates and unknown names.
    fn fields<'a>(
        &mut self,
        block: &'a Block,
        owner: &str,
        owner_span: Span,
        known: &[&str],
    ) -> Fields<'a> {
        let mut by_name: BTreeMap<String, &'a Entry> = BTreeMap::new();
        for entry in &block.entries {
            let name = entry.key.text().to_string();
            if matches!(entry.key.kind, KeyKind::Index(_)) || !known.contains(&name.as_str()) {
                let mut d = Diagnostic::error(
                    "E0101",
                    entry.key.span,
                    format!("unknown field `{name}` in `{owner}`"),
                )
                .label("not a field of this block");
                if let Some(s) = suggest(&name, known.iter().copied()) {
                    d = d.help(format!("did you mean `{s}`?"));
                } else {
                    d = d.note(format!("the fields of `{owner}` are: {}", known.join(", ")));
                }
                self.err(d);
                continue;
            }
            if let Some(first) = by_name.get(&name) {
                let first_span = first.key.span;
                self.err(
                    Diagnostic::error(
                        "E0102",
                        entry.key.span,
                        format!("field `{name}` is set twice in `{owner}`"),
                    )
                    .label("set again here")
                    .secondary(first_span, "first set here"),
                );
                continue;
            }
            by_name.insert(name, entry);
        }
        Fields {
            owner: owner.to_string(),
            owner_span,
            by_name,
        }
    }

    fn require<'a>(&mut self, f: &Fields<'a>, name: &str, example: &str) -> Option<&'a Entry> {
        let e = f.get(name);
        if e.is_none() {
            self.err(
                Diagnostic::error(
                    "E0103",
                    f.owner_span,
                    format!("`{}` has no `{name}`", f.owner),
                )
                .label(format!("`{name}` is required here"))
                .help(if example.starts_with('{') {
                    // Blocks are written `name { ... }`, without `=`.
                    format!("add `{name} {example}`")
                } else {
                    format!("add `{name} = {example}`")
                }),
            );
        }
        e
    }

    /// The value of an assignment entry, or an error if the entry is a block.
    fn value<'a>(&mut self, entry: &'a Entry) -> Option<&'a Value> {
        match &entry.body {
            EntryBody::Assign(v) => Some(v),
            EntryBody::Block(b) => {
                self.err(
                    Diagnostic::error(
                        "E0104",
                        b.span,
                        format!("`{}` takes a value, not a block", entry.key.text()),
                    )
                    .label("a block")
                    .help(format!("write `{} = ...`", entry.key.text())),
                );
                None
            }
        }
    }

    fn block<'a>(&mut self, entry: &'a Entry) -> Option<&'a Block> {
        match &entry.body {
            EntryBody::Block(b) => Some(b),
            EntryBody::Assign(v) => {
                self.err(
                    Diagnostic::error(
                        "E0104",
                        v.span,
                        format!("`{}` takes a block, not a value", entry.key.text()),
                    )
                    .label("a value")
                    .help(format!("write `{} {{ ... }}`", entry.key.text())),
                );
                None
            }
        }
    }

    /// Evaluates a plain value (a number, quantity, boolean or string).
    fn scalar(&mut self, v: &Value, what: &str) -> Option<Val> {
        match &v.kind {
            ValueKind::Expr { expr, unit } => {
                if let (ExprKind::Name(n), None) = (&expr.kind, unit) {
                    if !self.consts.contains_key(n) && !self.all_lets.contains_key(n) {
                        let mut d = Diagnostic::error(
                            "E0201",
                            v.span,
                            format!("expected {what}, found the name `{n}`"),
                        )
                        .label("not a constant");
                        if let Some(s) = suggest(n, self.consts.keys().map(String::as_str)) {
                            d = d.help(format!("did you mean the constant `{s}`?"));
                        }
                        self.err(d);
                        return None;
                    }
                }
                self.eval(expr, unit.as_ref())
            }
            ValueKind::Tagged { tag, .. } => {
                self.err(
                    Diagnostic::error(
                        "E0201",
                        v.span,
                        format!("expected {what}, found `{} {{ ... }}`", tag.name),
                    )
                    .label("not a plain value"),
                );
                None
            }
            ValueKind::List(_) => {
                self.err(
                    Diagnostic::error("E0201", v.span, format!("expected {what}, found a list"))
                        .label("a list"),
                );
                None
            }
        }
    }

    fn int_value(&mut self, v: &Value, field: &str, min: u64) -> Option<u64> {
        let val = self.scalar(v, "an integer")?;
        let n = match val {
            Val::Int(n) => n,
            Val::Float(f) => {
                let mut d = Diagnostic::error(
                    "E0201",
                    v.span,
                    format!(
                        "`{field}` must be an integer, found {}",
                        crate::spec::trim_float(f)
                    ),
                )
                .label("not a whole number");
                if f.fract() == 0.0 {
                    d = d.help(format!("write `{}`", f as i64));
                }
                self.err(d);
                return None;
            }
            Val::Quantity(..) => {
                self.err(
                    Diagnostic::error(
                        "E0203",
                        v.span,
                        format!("`{field}` is a count and takes no unit"),
                    )
                    .label("remove the unit"),
                );
                return None;
            }
            other => {
                self.err(
                    Diagnostic::error(
                        "E0201",
                        v.span,
                        format!("`{field}` must be an integer, found {}", other.describe()),
                    )
                    .label("wrong type"),
                );
                return None;
            }
        };
        if n < 0 || (n as u64) < min {
            self.err(
                Diagnostic::error(
                    "E0202",
                    v.span,
                    format!("`{field}` must be at least {min}, found {n}"),
                )
                .label("out of range"),
            );
            return None;
        }
        Some(n as u64)
    }

    /// Passes `value` through if it is at most `max`, else reports it.
    fn at_most(&mut self, f: &Fields, name: &str, value: u64, max: u64) -> Option<u64> {
        if value <= max {
            return Some(value);
        }
        let span = f.get(name).map(|e| e.span).unwrap_or(f.owner_span);
        self.err(
            Diagnostic::error(
                "E0202",
                span,
                format!("`{name}` is {value}; moec supports at most {max}"),
            )
            .label("out of range"),
        );
        None
    }

    fn int(&mut self, f: &Fields, name: &str, min: u64) -> Option<u64> {
        let e = f.get(name)?;
        let v = self.value(e)?;
        self.int_value(v, name, min)
    }

    fn req_int(&mut self, f: &Fields, name: &str, min: u64, example: &str) -> Option<u64> {
        self.require(f, name, example)?;
        self.int(f, name, min)
    }

    /// The number `v` (an integer or a decimal) of the field `name`, or an
    /// E0201 naming what it is instead.
    fn number(&mut self, v: &Value, name: &str) -> Option<f64> {
        match self.scalar(v, "a number")? {
            Val::Int(i) => Some(i as f64),
            Val::Float(x) => Some(x),
            other => {
                self.err(
                    Diagnostic::error(
                        "E0201",
                        v.span,
                        format!("`{name}` must be a number, found {}", other.describe()),
                    )
                    .label("wrong type"),
                );
                None
            }
        }
    }

    /// A positive, finite decimal number.
    fn positive(&mut self, f: &Fields, name: &str) -> Option<f64> {
        let e = f.get(name)?;
        let v = self.value(e)?;
        let x = self.number(v, name)?;
        if x <= 0.0 || !x.is_finite() {
            self.err(
                Diagnostic::error(
                    "E0202",
                    v.span,
                    format!("`{name}` must be a positive number"),
                )
                .label("out of range"),
            );
            return None;
        }
        Some(x)
    }

    fn boolean(&mut self, f: &Fields, name: &str) -> Option<bool> {
        let e = f.get(name)?;
        let v = self.value(e)?;
        match self.scalar(v, "`true` or `false`")? {
            Val::Bool(b) => Some(b),
            other => {
                self.err(
                    Diagnostic::error(
                        "E0201",
                        v.span,
                        format!(
                            "`{name}` must be `true` or `false`, found {}",
                            other.describe()
                        ),
                    )
                    .label("wrong type"),
                );
                None
            }
        }
    }

    fn quantity(&mut self, f: &Fields, name: &str, dim: Dim) -> Option<f64> {
        let e = f.get(name)?;
        let v = self.value(e)?;
        match self.scalar(
            v,
            &format!("{} such as `{}`", dim.describe(), dim.example()),
        )? {
            Val::Quantity(q, d) if d == dim => {
                if q <= 0.0 {
                    self.err(
                        Diagnostic::error("E0202", v.span, format!("`{name}` must be positive"))
                            .label("out of range"),
                    );
                    return None;
                }
                Some(q)
            }
            Val::Quantity(_, d) => {
                self.err(
                    Diagnostic::error(
                        "E0203",
                        v.span,
                        format!("`{name}` is {}, not {}", dim.describe(), d.describe()),
                    )
                    .label("wrong unit")
                    .help(format!("for example `{name} = {}`", dim.example())),
                );
                None
            }
            Val::Int(_) | Val::Float(_) => {
                self.err(
                    Diagnostic::error("E0203", v.span, format!("`{name}` needs a unit"))
                        .label("a bare number")
                        .help(format!("for example `{name} = {}`", dim.example())),
                );
                None
            }
            other => {
                self.err(
                    Diagnostic::error(
                        "E0201",
                        v.span,
                        format!(
                            "`{name}` must be {}, found {}",
                            dim.describe(),
                            other.describe()
                        ),
                    )
                    .label("wrong type"),
                );
                None
            }
        }
    }

    /// A keyword value from `choices`.
    fn keyword_value(
        &mut self,
        v: &Value,
        field: &str,
        choices: &[&'static str],
    ) -> Option<&'static str> {
        let Some(name) = v.as_name() else {
            self.err(
                Diagnostic::error(
                    "E0201",
                    v.span,
                    format!("`{field}` must be one of: {}", choices.join(", ")),
                )
                .label("not one of the choices"),
            );
            return None;
        };
        if let Some(c) = choices.iter().find(|c| **c == name) {
            return Some(c);
        }
        let mut d = Diagnostic::error(
            "E0101",
            v.span,
            format!("unknown value `{name}` for `{field}`"),
        )
        .label(format!("expected one of: {}", choices.join(", ")));
        if let Some(s) = suggest(name, choices.iter().copied()) {
            d = d.help(format!("did you mean `{s}`?"));
        }
        self.err(d);
        None
    }

    fn keyword(
        &mut self,
        f: &Fields,
        name: &str,
        choices: &[&'static str],
    ) -> Option<&'static str> {
        let e = f.get(name)?;
        let v = self.value(e)?;
        self.keyword_value(v, name, choices)
    }

    fn dtype(&mut self, f: &Fields, name: &str) -> Option<DType> {
        let e = f.get(name)?;
        let v = self.value(e)?;
        let k = self.keyword_value(v, name, &["f32", "bf16", "f16", "fp8_e4m3"])?;
        Some(match k {
            "f32" => DType::F32,
            "bf16" => DType::Bf16,
            "f16" => DType::F16,
            _ => DType::Fp8E4m3,
        })
    }

    fn key_span(&self, f: &Fields, name: &str) -> Option<Span> {
        f.get(name).map(|e| e.span)
    }

    // ---------------------------------------------------------------- layer

    fn layer(&mut self, s: &Section) -> Option<(Layer, LayerSpans)> {
        let name = match &s.name {
            Some(n) => Some(n.name.clone()),
            None => {
                self.err(
                    Diagnostic::error("E0103", s.kind.span, "the layer has no name")
                        .label("name expected after `layer`")
                        .help("write `layer my_layer { ... }`"),
                );
                None
            }
        };
        let f = self.fields(
            &s.body,
            "layer",
            s.kind.span,
            &[
                "hidden",
                "dtype",
                "dispatch_dtype",
                "tokens_per_rank",
                "experts",
                "shared_experts",
                "router",
                "capacity",
            ],
        );
        let mut spans = LayerSpans::default();
        let hidden = self.req_int(&f, "hidden", 1, "4096");
        let tokens = self.req_int(&f, "tokens_per_rank", 1, "4096");
        spans.tokens = self.key_span(&f, "tokens_per_rank").unwrap_or(s.kind.span);
        let dtype = match f.get("dtype") {
            Some(_) => self.dtype(&f, "dtype"),
            None => Some(DType::Bf16),
        };
        if dtype == Some(DType::Fp8E4m3) {
            if let Some(e) = f.get("dtype") {
                self.err(
                    Diagnostic::error("E0202", e.span, "fp8_e4m3 is a dispatch type, not a compute type")
                        .label("use f32, bf16 or f16 here")
                        .help("write `dtype = bf16` and `dispatch_dtype = fp8_e4m3` to send tokens in fp8"),
                );
            }
        }
        let dispatch_dtype = match f.get("dispatch_dtype") {
            Some(e) => {
                spans.dispatch_dtype = Some(e.span);
                let d = self.dtype(&f, "dispatch_dtype");
                if let (Some(d), Some(c)) = (d, dtype) {
                    if d != c && d != DType::Fp8E4m3 {
                        self.err(
                            Diagnostic::error("E0202", e.span, format!("dispatch_dtype `{}` is neither the layer's dtype `{}` nor fp8_e4m3", d.keyword(), c.keyword()))
                                .label("unsupported dispatch type")
                                .help(format!("write `dispatch_dtype = {}` or `dispatch_dtype = fp8_e4m3`", c.keyword())),
                        );
                    }
                }
                d
            }
            None => dtype,
        };
        let experts = match self.require(
            &f,
            "experts",
            "{ count = 8 ffn = swiglu intermediate = 14336 }",
        ) {
            Some(e) => self
                .block(e)
                .and_then(|b| self.experts(b, e.key.span, &mut spans)),
            None => None,
        };
        let shared = match f.get("shared_experts") {
            Some(e) => match self.block(e) {
                Some(b) => self.shared(b, e.key.span, experts.as_ref()).map(Some),
                None => None,
            },
            None => Some(None),
        };
        let router = match self.require(&f, "router", "{ scoring = softmax top_k = 2 }") {
            Some(e) => self
                .block(e)
                .and_then(|b| self.router(b, e.key.span, &spans)),
            None => None,
        };
        let capacity = match f.get("capacity") {
            Some(e) => self.capacity(e),
            None => Some(Capacity::Dropless),
        };
        Some((
            Layer {
                name: name?,
                hidden: hidden?,
                dtype: dtype?,
                dispatch_dtype: dispatch_dtype?,
                tokens_per_rank: tokens?,
                experts: experts?,
                shared: shared?,
                router: router?,
                capacity: capacity?,
            },
            spans,
        ))
    }

    fn ffn(&mut self, f: &Fields, limit: Option<f64>) -> Option<Ffn> {
        let k = self.keyword(f, "ffn", &["swiglu", "gelu", "gelu_tanh", "relu"])?;
        Some(match k {
            "swiglu" => Ffn::SwiGlu { limit },
            "gelu" => Ffn::Gelu { tanh: false },
            "gelu_tanh" => Ffn::Gelu { tanh: true },
            _ => Ffn::Relu,
        })
    }

    fn experts(&mut self, b: &Block, at: Span, spans: &mut LayerSpans) -> Option<Experts> {
        let f = self.fields(
            b,
            "experts",
            at,
            &["count", "ffn", "intermediate", "bias", "swiglu_limit"],
        );
        let count = self.req_int(&f, "count", 1, "8");
        let count = count.and_then(|c| self.at_most(&f, "count", c, MAX_EXPERTS));
        spans.experts_count = self.key_span(&f, "count").unwrap_or(at);
        spans.experts_count_value = count;
        self.require(&f, "ffn", "swiglu");
        let limit = self.positive(&f, "swiglu_limit");
        let ffn = self.ffn(&f, limit);
        if let (Some(kind), Some(e)) = (ffn, f.get("swiglu_limit")) {
            if !matches!(kind, Ffn::SwiGlu { .. }) {
                self.err(
                    Diagnostic::error(
                        "E0304",
                        e.span,
                        format!(
                            "`swiglu_limit` applies only to swiglu experts, not {}",
                            kind.keyword()
                        ),
                    )
                    .label("no SwiGLU to clamp")
                    .help("remove this line or write `ffn = swiglu`"),
                );
            }
        }
        let intermediate = self.req_int(&f, "intermediate", 1, "14336");
        spans.intermediate = self.key_span(&f, "intermediate").unwrap_or(at);
        let bias = match f.get("bias") {
            Some(_) => self.boolean(&f, "bias"),
            None => Some(false),
        };
        Some(Experts {
            count: count?,
            ffn: ffn?,
            intermediate: intermediate?,
            bias: bias?,
        })
    }

    fn shared(&mut self, b: &Block, at: Span, experts: Option<&Experts>) -> Option<SharedExperts> {
        let f = self.fields(
            b,
            "shared_experts",
            at,
            &["count", "intermediate", "ffn", "bias", "gate"],
        );
        let count = match f.get("count") {
            Some(_) => self.int(&f, "count", 1),
            None => Some(1),
        };
        let intermediate = self.req_int(&f, "intermediate", 1, "2048");
        // A shared expert is built like the routed ones unless it says otherwise.
        let ffn = match f.get("ffn") {
            Some(_) => self.ffn(&f, None),
            None => experts.map(|e| e.ffn),
        };
        let bias = match f.get("bias") {
            Some(_) => self.boolean(&f, "bias"),
            None => experts.map(|e| e.bias),
        };
        let gate = match f.get("gate") {
            Some(_) => self
                .keyword(&f, "gate", &["sigmoid", "none"])
                .map(|g| g == "sigmoid"),
            None => Some(false),
        };
        Some(SharedExperts {
            count: count?,
            intermediate: intermediate?,
            ffn: ffn?,
            bias: bias?,
            sigmoid_gate: gate?,
        })
    }

    fn router(&mut self, b: &Block, at: Span, spans: &LayerSpans) -> Option<Router> {
        let f = self.fields(
            b,
            "router",
            at,
            &[
                "scoring",
                "top_k",
                "logit_bias",
                "softmax_over",
                "selection_bias",
                "groups",
                "groups_kept",
                "group_score",
                "normalize",
                "scale",
                "weight_on",
            ],
        );
        self.require(&f, "scoring", "softmax");
        let scoring = self
            .keyword(&f, "scoring", &["softmax", "sigmoid"])
            .map(|s| {
                if s == "softmax" {
                    Scoring::Softmax
                } else {
                    Scoring::Sigmoid
                }
            });
        let top_k = self.req_int(&f, "top_k", 1, "2");
        let expert_count = spans.experts_count_value;
        if let (Some(k), Some(count), Some(entry)) = (top_k, expert_count, f.get("top_k")) {
            if k > count {
                self.err(
                    Diagnostic::error(
                        "E0301",
                        entry.span,
                        format!("top_k is {k} but the layer has only {count} experts"),
                    )
                    .label("more experts per token than exist")
                    .secondary(spans.experts_count, "the expert count"),
                );
            }
        }
        let softmax_over = match f.get("softmax_over") {
            Some(e) => {
                let v = self.keyword(&f, "softmax_over", &["all", "topk"]);
                if scoring == Some(Scoring::Sigmoid) {
                    self.err(
                        Diagnostic::error(
                            "E0303",
                            e.span,
                            "`softmax_over` applies only to softmax scoring",
                        )
                        .label("the router scores with a sigmoid")
                        .help("remove this line, or write `scoring = softmax`"),
                    );
                }
                v.map(|v| {
                    if v == "all" {
                        SoftmaxOver::All
                    } else {
                        SoftmaxOver::TopK
                    }
                })
            }
            None => Some(SoftmaxOver::All),
        };
        let logit_bias = match f.get("logit_bias") {
            Some(_) => self.boolean(&f, "logit_bias"),
            None => Some(false),
        };
        let selection_bias = match f.get("selection_bias") {
            Some(_) => self.boolean(&f, "selection_bias"),
            None => Some(false),
        };
        let groups = self.groups(&f, at, expert_count, top_k);
        let normalize = match f.get("normalize") {
            Some(_) => self.boolean(&f, "normalize"),
            None => Some(false),
        };
        if let (Some(true), Some(SoftmaxOver::TopK), Some(e)) =
            (normalize, softmax_over, f.get("normalize"))
        {
            self.err(
                Diagnostic::warning(
                    "W0001",
                    e.span,
                    "`normalize = true` has no effect after a softmax over the top k",
                )
                .label("the weights already sum to one"),
            );
        }
        let scale = match f.get("scale") {
            Some(_) => self.positive(&f, "scale"),
            None => Some(1.0),
        };
        let weight_on = match f.get("weight_on") {
            Some(_) => self
                .keyword(&f, "weight_on", &["output", "input"])
                .map(|w| {
                    if w == "output" {
                        WeightOn::Output
                    } else {
                        WeightOn::Input
                    }
                }),
            None => Some(WeightOn::Output),
        };
        Some(Router {
            scoring: scoring?,
            top_k: top_k?,
            logit_bias: logit_bias?,
            softmax_over: softmax_over?,
            selection_bias: selection_bias?,
            groups: groups?,
            normalize: normalize?,
            scale: scale?,
            weight_on: weight_on?,
        })
    }

    /// Group-limited selection: `Some(None)` when not grouped, `None` on error.
    fn groups(
        &mut self,
        f: &Fields,
        at: Span,
        expert_count: Option<u64>,
        top_k: Option<u64>,
    ) -> Option<Option<Groups>> {
        let (g_entry, k_entry, s_entry) =
            (f.get("groups"), f.get("groups_kept"), f.get("group_score"));
        if g_entry.is_none() {
            for e in [k_entry, s_entry].into_iter().flatten() {
                self.err(
                    Diagnostic::error(
                        "E0302",
                        e.span,
                        format!("`{}` needs `groups`", e.key.text()),
                    )
                    .label("no groups to choose from")
                    .help("add `groups = N` (the number of expert groups)"),
                );
            }
            return if k_entry.is_some() || s_entry.is_some() {
                None
            } else {
                Some(None)
            };
        }
        let count = self.int(f, "groups", 1);
        let kept = match k_entry {
            Some(_) => self.int(f, "groups_kept", 1),
            None => {
                self.err(
                    Diagnostic::error(
                        "E0302",
                        g_entry.map(|e| e.span).unwrap_or(at),
                        "`groups` needs `groups_kept`",
                    )
                    .label("how many groups to keep?")
                    .help("add `groups_kept = N`"),
                );
                None
            }
        };
        let score = match s_entry {
            Some(_) => self
                .keyword(f, "group_score", &["top2_sum", "max"])
                .map(|s| {
                    if s == "max" {
                        GroupScore::Max
                    } else {
                        GroupScore::Top2Sum
                    }
                }),
            None => Some(GroupScore::Top2Sum),
        };
        let (count, kept, score) = (count?, kept?, score?);
        let mut ok = true;
        if kept > count {
            ok = false;
            self.err(
                Diagnostic::error(
                    "E0302",
                    k_entry.map(|e| e.span).unwrap_or(at),
                    format!("groups_kept is {kept} but there are only {count} groups"),
                )
                .label("more groups kept than exist"),
            );
        }
        if let Some(experts) = expert_count {
            if experts % count != 0 {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0302",
                        g_entry.map(|e| e.span).unwrap_or(at),
                        format!("{experts} experts cannot be split into {count} equal groups"),
                    )
                    .label("does not divide the expert count"),
                );
            } else {
                let per_group = experts / count;
                if score == GroupScore::Top2Sum && per_group < 2 {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0302",
                            s_entry.or(g_entry).map(|e| e.span).unwrap_or(at),
                            format!("a group of {per_group} expert has no two best scores to sum"),
                        )
                        .label("top2_sum needs at least two experts per group")
                        .help("use fewer groups, or `group_score = max`"),
                    );
                }
                if let Some(k) = top_k {
                    if kept <= count && kept * per_group < k {
                        ok = false;
                        self.err(
                            Diagnostic::error("E0302", k_entry.map(|e| e.span).unwrap_or(at), format!("the {kept} kept groups hold {} experts, fewer than top_k = {k}", kept * per_group))
                                .label("too few experts to choose from"),
                        );
                    }
                }
            }
        }
        ok.then_some(Some(Groups { count, kept, score }))
    }

    fn capacity(&mut self, e: &Entry) -> Option<Capacity> {
        match &e.body {
            EntryBody::Assign(v) if v.as_name().is_none() => {
                // `capacity = 1.25`: a number where a block belongs.
                self.err(
                    Diagnostic::error("E0201", v.span, "`capacity` must be `dropless` or a block")
                        .label("a capacity limit goes in a block")
                        .help("write `capacity { factor = 1.25 }` (a factor of the mean load per expert) or `capacity { slots = N }`; `capacity = dropless` keeps every token"),
                );
                None
            }
            EntryBody::Assign(v) => {
                let k = self.keyword_value(v, "capacity", &["dropless"])?;
                debug_assert_eq!(k, "dropless");
                Some(Capacity::Dropless)
            }
            EntryBody::Block(b) => {
                let f = self.fields(b, "capacity", e.key.span, &["factor", "slots", "drop"]);
                let limit = match (f.get("factor"), f.get("slots")) {
                    (Some(_), Some(s)) => {
                        self.err(
                            Diagnostic::error(
                                "E0305",
                                s.span,
                                "a capacity has a `factor` or `slots`, not both",
                            )
                            .label("remove one of the two"),
                        );
                        None
                    }
                    (Some(_), None) => self.positive(&f, "factor").map(CapacityLimit::Factor),
                    (None, Some(_)) => self.int(&f, "slots", 1).map(CapacityLimit::Slots),
                    (None, None) => {
                        self.err(
                            Diagnostic::error("E0305", e.key.span, "a capacity block needs a `factor` or `slots`")
                                .label("no limit given")
                                .help("write `capacity { factor = 1.25 drop = position }`, or `capacity = dropless`"),
                        );
                        None
                    }
                };
                let drop = match f.get("drop") {
                    Some(_) => self.keyword(&f, "drop", &["position", "probs"]).map(|d| {
                        if d == "probs" {
                            DropPolicy::Probs
                        } else {
                            DropPolicy::Position
                        }
                    }),
                    None => Some(DropPolicy::Position),
                };
                Some(Capacity::Limited {
                    limit: limit?,
                    drop: drop?,
                })
            }
        }
    }

    // ----------------------------------------------------------------- mesh

    fn mesh(&mut self, s: &Section, layer: Option<&Layer>) -> Option<Mesh> {
        if let Some(n) = &s.name {
            self.err(
                Diagnostic::error("E0101", n.span, "a `mesh` section takes no name")
                    .label("remove this name"),
            );
        }
        let f = self.fields(
            &s.body,
            "mesh",
            s.kind.span,
            &[
                "nodes",
                "gpus_per_node",
                "device",
                "intra_node",
                "inter_node",
                "ep",
                "etp",
                "dp",
                "placement",
                "replicas",
            ],
        );
        let nodes = match f.get("nodes") {
            Some(_) => self.int(&f, "nodes", 1),
            None => Some(1),
        };
        let gpus = self.req_int(&f, "gpus_per_node", 1, "8");
        let device = match self.require(&f, "device", "H100") {
            Some(e) => self.device(e),
            None => None,
        };
        let nvlink = device.as_ref().map(|(_, nv)| *nv);
        let intra = match f.get("intra_node") {
            Some(e) => self
                .block(e)
                .and_then(|b| self.link(b, e.key.span, "intra_node", DEFAULT_INTRA_LATENCY)),
            None => nvlink.map(|bw| Link {
                bandwidth: bw,
                latency: DEFAULT_INTRA_LATENCY,
            }),
        };
        let inter = match f.get("inter_node") {
            Some(e) => {
                if nodes == Some(1) {
                    self.err(
                        Diagnostic::warning(
                            "W0001",
                            e.key.span,
                            "`inter_node` is ignored on a one-node mesh",
                        )
                        .label("no traffic crosses nodes"),
                    );
                }
                self.block(e)
                    .and_then(|b| self.link(b, e.key.span, "inter_node", DEFAULT_INTER_LATENCY))
                    .map(Some)
            }
            None => {
                if let Some(n) = nodes.filter(|n| *n > 1) {
                    self.err(
                        Diagnostic::error("E0405", self.key_span(&f, "nodes").unwrap_or(s.kind.span), format!("a mesh of {n} nodes needs an `inter_node` link"))
                            .label("tokens will cross nodes")
                            .help("add `inter_node { bandwidth = 50 GB/s latency = 10 us }` (one 400 Gb/s NIC per GPU)"),
                    );
                    None
                } else {
                    Some(None)
                }
            }
        };
        let ep = self.req_int(&f, "ep", 1, "8");
        let ep = ep.and_then(|v| self.at_most(&f, "ep", v, MAX_RANKS));
        let etp = match f.get("etp") {
            Some(_) => self.int(&f, "etp", 1),
            None => Some(1),
        };
        let dp = match f.get("dp") {
            Some(_) => self.int(&f, "dp", 1),
            None => Some(1),
        };
        if let (Some(n), Some(g), Some(ep), Some(etp), Some(dp)) = (nodes, gpus, ep, etp, dp) {
            let world = n.checked_mul(g).filter(|w| *w <= MAX_RANKS);
            let product = ep.checked_mul(etp).and_then(|x| x.checked_mul(dp));
            if world.is_none() && product.is_some() && n.checked_mul(g) == product {
                // The factors agree; the mesh is only too large.
                let at = self
                    .key_span(&f, "nodes")
                    .or(self.key_span(&f, "gpus_per_node"))
                    .unwrap_or(s.kind.span);
                self.err(
                    Diagnostic::error(
                        "E0401",
                        at,
                        format!(
                            "the mesh has {} GPUs, more than the {MAX_RANKS} moec supports",
                            n.saturating_mul(g)
                        ),
                    )
                    .label("too many GPUs")
                    .note(format!("nodes × gpus_per_node = {n} × {g}"))
                    .help("model a part of the cluster: the plan is per EP group, and dp replicas repeat it"),
                );
            } else if world.is_none() || world != product {
                let at = self.key_span(&f, "ep").unwrap_or(s.kind.span);
                self.err(
                    Diagnostic::error(
                        "E0401",
                        at,
                        format!(
                            "the mesh has {} GPUs but ep × etp × dp = {ep} × {etp} × {dp} = {}",
                            n.checked_mul(g).map(|w| w.to_string()).unwrap_or_else(|| "too many".into()),
                            product.map(|p| p.to_string()).unwrap_or_else(|| "too many".into())
                        ),
                    )
                    .label("does not cover the mesh")
                    .note(format!("nodes × gpus_per_node = {n} × {g}; moec supports up to {MAX_RANKS} GPUs"))
                    .help("every GPU belongs to exactly one (ep, etp, dp) position; adjust ep, etp or dp"),
                );
            }
        }
        if let (Some(etp), Some(l)) = (etp, layer) {
            if l.experts.intermediate % etp != 0 {
                let at = self.key_span(&f, "etp").unwrap_or(s.kind.span);
                self.err(
                    Diagnostic::error(
                        "E0406",
                        at,
                        format!(
                            "etp {etp} does not divide the experts' intermediate size {}",
                            l.experts.intermediate
                        ),
                    )
                    .label("expert weights cannot be split evenly"),
                );
            }
        }
        let placement = match f.get("placement") {
            Some(e) => self.placement(e, ep, layer),
            None => Some(Placement::Contiguous),
        };
        if let (Some(ep), Some(l), Some(p)) = (ep, layer, placement.as_ref()) {
            if !matches!(p, Placement::Explicit(_)) && l.experts.count % ep != 0 {
                let at = self.key_span(&f, "ep").unwrap_or(s.kind.span);
                self.err(
                    Diagnostic::error("E0402", at, format!("ep {ep} does not divide the {} experts", l.experts.count))
                        .label("experts cannot be spread evenly")
                        .help("choose an ep that divides the expert count, or give `placement = explicit { ... }`"),
                );
            }
        }
        let replicas = match f.get("replicas") {
            Some(e) => self.replicas(e, ep, layer, placement.as_ref()),
            None => Some(BTreeMap::new()),
        };
        let (device, _) = device?;
        Some(Mesh {
            nodes: nodes?,
            gpus_per_node: gpus?,
            device,
            intra_node: intra?,
            inter_node: inter?,
            ep: ep?,
            etp: etp?,
            dp: dp?,
            placement: placement?,
            replicas: replicas?,
        })
    }

    /// A device preset, possibly with overrides, or a custom device. Returns it and its NVLink bandwidth.
    fn device(&mut self, e: &Entry) -> Option<(Device, f64)> {
        let v = self.value(e)?;
        let names: Vec<&'static str> = DEVICES.iter().map(|d| d.name).chain(["custom"]).collect();
        let (tag, body) = match &v.kind {
            ValueKind::Tagged { tag, body } => (tag, Some(body)),
            _ => match v.as_name() {
                Some(_) => (
                    &crate::ast::Ident {
                        name: v.as_name().unwrap_or_default().to_string(),
                        span: v.span,
                    },
                    None,
                ),
                None => {
                    self.err(
                        Diagnostic::error("E0201", v.span, "`device` must name a device")
                            .label(format!("expected one of: {}", names.join(", "))),
                    );
                    return None;
                }
            },
        };
        let preset = DEVICES.iter().find(|d| d.name == tag.name);
        if preset.is_none() && tag.name != "custom" {
            let mut d =
                Diagnostic::error("E0101", tag.span, format!("unknown device `{}`", tag.name))
                    .label(format!("expected one of: {}", names.join(", ")));
            if let Some(s) = suggest(&tag.name, names.iter().copied()) {
                d = d.help(format!("did you mean `{s}`?"));
            } else {
                d = d.help("describe it with `device = custom { peak_flops = 989 TFLOP/s memory_bandwidth = 3.35 TB/s memory = 80 GB nvlink = 450 GB/s }`");
            }
            self.err(d);
            return None;
        }
        let mut device = Device {
            name: tag.name.clone(),
            peak_flops: preset.map(|p| p.peak_flops).unwrap_or(0.0),
            memory_bandwidth: preset.map(|p| p.memory_bandwidth).unwrap_or(0.0),
            memory: preset.map(|p| p.memory).unwrap_or(0.0),
        };
        let mut nvlink = preset.map(|p| p.nvlink).unwrap_or(0.0);
        if let Some(body) = body {
            let f = self.fields(
                body,
                "device",
                tag.span,
                &["peak_flops", "memory_bandwidth", "memory", "nvlink"],
            );
            let required = preset.is_none();
            let mut ok = true;
            for (field, dim, slot, example) in [
                (
                    "peak_flops",
                    Dim::Compute,
                    &mut device.peak_flops,
                    "989 TFLOP/s",
                ),
                (
                    "memory_bandwidth",
                    Dim::Bandwidth,
                    &mut device.memory_bandwidth,
                    "3.35 TB/s",
                ),
                ("memory", Dim::Bytes, &mut device.memory, "80 GB"),
                ("nvlink", Dim::Bandwidth, &mut nvlink, "450 GB/s"),
            ] {
                if f.get(field).is_some() {
                    match self.quantity(&f, field, dim) {
                        Some(q) => *slot = q,
                        None => ok = false,
                    }
                } else if required {
                    ok = false;
                    self.require(&f, field, example);
                }
            }
            if !ok {
                return None;
            }
        } else if preset.is_none() {
            self.err(
                Diagnostic::error("E0103", tag.span, "a custom device needs its figures")
                    .label("no figures given")
                    .help("write `device = custom { peak_flops = 989 TFLOP/s memory_bandwidth = 3.35 TB/s memory = 80 GB nvlink = 450 GB/s }`"),
            );
            return None;
        }
        Some((device, nvlink))
    }

    fn link(&mut self, b: &Block, at: Span, owner: &str, default_latency: f64) -> Option<Link> {
        let f = self.fields(b, owner, at, &["bandwidth", "latency"]);
        self.require(&f, "bandwidth", "450 GB/s");
        let bandwidth = self.quantity(&f, "bandwidth", Dim::Bandwidth);
        let latency = match f.get("latency") {
            Some(_) => self.quantity(&f, "latency", Dim::Time),
            None => Some(default_latency),
        };
        Some(Link {
            bandwidth: bandwidth?,
            latency: latency?,
        })
    }

    fn placement(
        &mut self,
        e: &Entry,
        ep: Option<u64>,
        layer: Option<&Layer>,
    ) -> Option<Placement> {
        let v = self.value(e)?;
        if let ValueKind::Tagged { tag, body } = &v.kind {
            if tag.name != "explicit" {
                self.err(
                    Diagnostic::error(
                        "E0101",
                        tag.span,
                        format!("unknown placement `{}`", tag.name),
                    )
                    .label("expected contiguous, round_robin or explicit { ... }"),
                );
                return None;
            }
            return self.explicit(body, tag.span, ep?, layer?);
        }
        let k = self.keyword_value(v, "placement", &["contiguous", "round_robin", "explicit"])?;
        match k {
            "contiguous" => Some(Placement::Contiguous),
            "round_robin" => Some(Placement::RoundRobin),
            _ => {
                self.err(
                    Diagnostic::error("E0103", v.span, "an explicit placement needs its map")
                        .label("which experts go where?")
                        .help("write `placement = explicit { 0 = [0, 1] 1 = [2, 3] }`: EP rank = experts"),
                );
                None
            }
        }
    }

    /// Parses `[1, 2, 3]` as indices below `bound`.
    fn index_list(
        &mut self,
        v: &Value,
        what: &str,
        bound: u64,
        bound_name: &str,
    ) -> Option<Vec<(u64, Span)>> {
        let ValueKind::List(items) = &v.kind else {
            self.err(
                Diagnostic::error("E0201", v.span, format!("expected a list of {what}s"))
                    .label("not a list")
                    .help("write e.g. `[0, 1, 2]`"),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match self.int_value(item, what, 0) {
                Some(i) if i < bound => out.push((i, item.span)),
                Some(i) => {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0403",
                            item.span,
                            format!("{what} {i} does not exist: there are {bound} {bound_name}"),
                        )
                        .label("out of range"),
                    );
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn rank_key(&mut self, entry: &Entry, ep: u64, code: &'static str) -> Option<u64> {
        match &entry.key.kind {
            KeyKind::Index(text) => match int_literal(text, entry.key.span) {
                Ok(r) if r >= 0 && (r as u64) < ep => Some(r as u64),
                Ok(r) => {
                    self.err(
                        Diagnostic::error(
                            code,
                            entry.key.span,
                            format!("ep rank {r} does not exist: ep is {ep}"),
                        )
                        .label("out of range"),
                    );
                    None
                }
                Err(d) => {
                    self.err(d);
                    None
                }
            },
            KeyKind::Name(n) => {
                self.err(
                    Diagnostic::error(
                        "E0201",
                        entry.key.span,
                        format!("expected an index, found the name `{n}`"),
                    )
                    .label("keys here are numbers"),
                );
                None
            }
        }
    }

    fn explicit(&mut self, body: &Block, at: Span, ep: u64, layer: &Layer) -> Option<Placement> {
        let experts = layer.experts.count;
        let mut ranks: Vec<Option<Vec<u64>>> = vec![None; usize::try_from(ep).ok()?.min(1 << 20)];
        let mut owner_of: BTreeMap<u64, Span> = BTreeMap::new();
        let mut rank_spans: BTreeMap<u64, Span> = BTreeMap::new();
        let mut ok = true;
        for entry in &body.entries {
            let Some(rank) = self.rank_key(entry, ep, "E0403") else {
                ok = false;
                continue;
            };
            if let Some(first) = rank_spans.get(&rank) {
                let first = *first;
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0403",
                        entry.key.span,
                        format!("ep rank {rank} is placed twice"),
                    )
                    .label("again here")
                    .secondary(first, "first here"),
                );
                continue;
            }
            rank_spans.insert(rank, entry.key.span);
            let Some(v) = self.value(entry) else {
                ok = false;
                continue;
            };
            let Some(list) = self.index_list(v, "expert", experts, "experts") else {
                ok = false;
                continue;
            };
            let mut mine = Vec::new();
            for (e, span) in list {
                if let Some(first) = owner_of.get(&e) {
                    let first = *first;
                    ok = false;
                    self.err(
                        Diagnostic::error("E0403", span, format!("expert {e} is placed twice"))
                            .label("placed again here")
                            .secondary(first, "first placed here")
                            .help(
                                "to keep extra copies of a hot expert, list them under `replicas`",
                            ),
                    );
                } else {
                    owner_of.insert(e, span);
                    mine.push(e);
                }
            }
            if let Some(slot) = usize::try_from(rank).ok().and_then(|r| ranks.get_mut(r)) {
                *slot = Some(mine);
            }
        }
        let missing_ranks: Vec<String> = (0..ep)
            .filter(|r| !rank_spans.contains_key(r))
            .take(8)
            .map(|r| r.to_string())
            .collect();
        if !missing_ranks.is_empty() && ok {
            ok = false;
            self.err(
                Diagnostic::error(
                    "E0403",
                    at,
                    format!(
                        "the explicit placement gives no experts to ep rank(s) {}",
                        missing_ranks.join(", ")
                    ),
                )
                .label("incomplete placement")
                .help("list every ep rank, `r = []` for a rank that holds no expert"),
            );
        }
        let missing: Vec<String> = (0..experts)
            .filter(|e| !owner_of.contains_key(e))
            .take(8)
            .map(|e| e.to_string())
            .collect();
        if !missing.is_empty() && ok {
            ok = false;
            let more = experts as usize - owner_of.len();
            self.err(
                Diagnostic::error(
                    "E0403",
                    at,
                    format!(
                        "the explicit placement misses {more} expert(s): {}{}",
                        missing.join(", "),
                        if more > missing.len() { ", ..." } else { "" }
                    ),
                )
                .label("every expert must live on some rank"),
            );
        }
        if !ok {
            return None;
        }
        Some(Placement::Explicit(
            ranks.into_iter().map(Option::unwrap_or_default).collect(),
        ))
    }

    fn replicas(
        &mut self,
        e: &Entry,
        ep: Option<u64>,
        layer: Option<&Layer>,
        placement: Option<&Placement>,
    ) -> Option<BTreeMap<u64, Vec<u64>>> {
        let b = self.block(e)?;
        let (ep, layer, placement) = (ep?, layer?, placement?);
        let owners: Vec<Vec<u64>> = Mesh {
            nodes: 1,
            gpus_per_node: 1,
            device: Device {
                name: String::new(),
                peak_flops: 0.0,
                memory_bandwidth: 0.0,
                memory: 0.0,
            },
            intra_node: Link {
                bandwidth: 0.0,
                latency: 0.0,
            },
            inter_node: None,
            ep,
            etp: 1,
            dp: 1,
            placement: placement.clone(),
            replicas: BTreeMap::new(),
        }
        .experts_of_rank(layer.experts.count);
        let mut out = BTreeMap::new();
        let mut ok = true;
        for entry in &b.entries {
            let expert = match &entry.key.kind {
                KeyKind::Index(text) => match int_literal(text, entry.key.span) {
                    Ok(x) if x >= 0 && (x as u64) < layer.experts.count => x as u64,
                    Ok(x) => {
                        ok = false;
                        self.err(
                            Diagnostic::error(
                                "E0404",
                                entry.key.span,
                                format!(
                                    "expert {x} does not exist: the layer has {} experts",
                                    layer.experts.count
                                ),
                            )
                            .label("no such expert"),
                        );
                        continue;
                    }
                    Err(d) => {
                        ok = false;
                        self.err(d);
                        continue;
                    }
                },
                KeyKind::Name(n) => {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0404",
                            entry.key.span,
                            format!("replicas are keyed by expert index, found `{n}`"),
                        )
                        .label("expected an expert index")
                        .help(
                            "write `replicas { 17 = [3, 9] }`: expert 17 also on ep ranks 3 and 9",
                        ),
                    );
                    continue;
                }
            };
            if out.contains_key(&expert) {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0102",
                        entry.key.span,
                        format!("expert {expert} has two replica lists"),
                    )
                    .label("again here"),
                );
                continue;
            }
            let Some(v) = self.value(entry) else {
                ok = false;
                continue;
            };
            let ValueKind::List(items) = &v.kind else {
                ok = false;
                self.err(
                    Diagnostic::error("E0201", v.span, "expected a list of ep ranks")
                        .label("not a list"),
                );
                continue;
            };
            let mut ranks = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for item in items {
                let Some(r) = self.int_value(item, "ep rank", 0) else {
                    ok = false;
                    continue;
                };
                if r >= ep {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0404",
                            item.span,
                            format!("ep rank {r} does not exist: ep is {ep}"),
                        )
                        .label("no such rank"),
                    );
                } else if owners
                    .get(r as usize)
                    .is_some_and(|list| list.contains(&expert))
                {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0404",
                            item.span,
                            format!("ep rank {r} already holds expert {expert}"),
                        )
                        .label("a replica must go to another rank"),
                    );
                } else if !seen.insert(r) {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0404",
                            item.span,
                            format!("ep rank {r} is listed twice"),
                        )
                        .label("duplicate"),
                    );
                } else {
                    ranks.push(r);
                }
            }
            out.insert(expert, ranks);
        }
        ok.then_some(out)
    }

    // ------------------------------------------------------------- schedule

    fn schedule(&mut self, s: &Section, layer: Option<&(Layer, LayerSpans)>) -> Option<Schedule> {
        if let Some(n) = &s.name {
            self.err(
                Diagnostic::error("E0101", n.span, "a `schedule` section takes no name")
                    .label("remove this name"),
            );
        }
        let f = self.fields(
            &s.body,
            "schedule",
            s.kind.span,
            &["overlap", "allow", "deny", "headroom"],
        );
        let overlap = match f.get("overlap") {
            Some(e) => {
                let v = self.value(e)?;
                if v.as_name() == Some("auto") {
                    Some(Overlap::Auto)
                } else {
                    let d = self.int_value(v, "overlap", 1).map(Overlap::Degree);
                    if let (Some(Overlap::Degree(d)), Some((l, _))) = (d, layer) {
                        if d > l.tokens_per_rank {
                            self.err(
                                Diagnostic::error(
                                    "E0601",
                                    v.span,
                                    format!(
                                        "overlap degree {d} is more than the {} tokens per rank",
                                        l.tokens_per_rank
                                    ),
                                )
                                .label("chunks would be empty"),
                            );
                            return None;
                        }
                    }
                    d
                }
            }
            None => Some(Overlap::Auto),
        };
        let allow = f.get("allow");
        let deny = f.get("deny");
        if let (Some(_), Some(d)) = (allow, deny) {
            self.err(
                Diagnostic::error("E0601", d.key.span, "give `allow` or `deny`, not both")
                    .label("conflicts with `allow`")
                    .help("`allow` lists the only rules that may fire; `deny` lists rules that may not"),
            );
            return None;
        }
        let rules = match (allow, deny) {
            (Some(e), _) => {
                let listed = self.rule_list(e)?;
                RULES
                    .iter()
                    .copied()
                    .filter(|r| listed.contains(r))
                    .collect::<Vec<_>>()
            }
            (None, Some(e)) => {
                let listed = self.rule_list(e)?;
                RULES
                    .iter()
                    .copied()
                    .filter(|r| !listed.contains(r))
                    .collect::<Vec<_>>()
            }
            (None, None) => RULES.to_vec(),
        };
        let overlap = overlap?;
        if let (Overlap::Degree(d), false) = (overlap, rules.contains(&"overlap_chunks")) {
            if d > 1 {
                let at = f.get("overlap").map(|e| e.span).unwrap_or(s.kind.span);
                self.err(
                    Diagnostic::error("E0601", at, format!("overlap degree {d} needs the `overlap_chunks` rule, which the schedule forbids"))
                        .label("cannot chunk without overlap_chunks"),
                );
                return None;
            }
        }
        if let Some((l, spans)) = layer {
            if rules.contains(&"fp8_dispatch")
                && l.dispatch_dtype != DType::Fp8E4m3
                && allow.is_some()
            {
                let at = allow.map(|e| e.span).unwrap_or(s.kind.span);
                let mut d = Diagnostic::warning("W0001", at, "`fp8_dispatch` is allowed but the layer's dispatch_dtype is not fp8_e4m3, so it never fires")
                    .label("has no effect");
                if let Some(sp) = spans.dispatch_dtype {
                    d = d.secondary(sp, "dispatch type set here");
                }
                self.err(d);
            }
        }
        let headroom = self.headroom(&f, layer)?;
        Some(Schedule {
            overlap,
            rules,
            headroom,
        })
    }

    /// `headroom = auto | worst_case | NUMBER` (a factor of at least 1).
    fn headroom(&mut self, f: &Fields, layer: Option<&(Layer, LayerSpans)>) -> Option<Headroom> {
        let Some(e) = f.get("headroom") else {
            return Some(Headroom::Auto);
        };
        let v = self.value(e)?;
        let headroom = match v.as_name() {
            Some("auto") => Headroom::Auto,
            Some("worst_case") => Headroom::WorstCase,
            Some(other) => {
                self.err(
                    Diagnostic::error(
                        "E0201",
                        v.span,
                        format!("`headroom` must be `auto`, `worst_case` or a number, found `{other}`"),
                    )
                    .label("unknown headroom")
                    .help("`headroom = 2` sizes a dropless layer's expert buffers for twice the expected load"),
                );
                return None;
            }
            None => {
                let x = self.number(v, "headroom")?;
                if !(x.is_finite() && x >= 1.0) {
                    self.err(
                        Diagnostic::error("E0202", v.span, "`headroom` must be at least 1")
                            .label("out of range")
                            .help("buffers smaller than the expected load would overflow on most passes; `headroom = 1.25` is the least the compiler picks itself"),
                    );
                    return None;
                }
                Headroom::Factor(x)
            }
        };
        if let Some((l, _)) = layer {
            if headroom != Headroom::Auto && l.capacity != Capacity::Dropless {
                self.err(
                    Diagnostic::warning(
                        "W0001",
                        v.span,
                        "`headroom` has no effect: the layer has a capacity, whose buffers hold exactly its slots",
                    )
                    .label("has no effect"),
                );
            }
        }
        Some(headroom)
    }

    fn rule_list(&mut self, e: &Entry) -> Option<Vec<&'static str>> {
        let v = self.value(e)?;
        let ValueKind::List(items) = &v.kind else {
            self.err(
                Diagnostic::error(
                    "E0201",
                    v.span,
                    format!("`{}` takes a list of rule names", e.key.text()),
                )
                .label("not a list")
                .help(format!(
                    "e.g. `{} = [overlap_chunks, fuse_router]`",
                    e.key.text()
                )),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match self.keyword_value(item, e.key.text(), RULES) {
                Some(r) if out.contains(&r) => {
                    self.err(
                        Diagnostic::warning(
                            "W0001",
                            item.span,
                            format!("rule `{r}` is listed twice"),
                        )
                        .label("duplicate"),
                    );
                }
                Some(r) => out.push(r),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    // -------------------------------------------------------------- derived

    /// Computes every size with checked arithmetic; an overflow is an error at the field that caused it.
    fn derive(&mut self, l: &Layer, m: &Mesh, spans: &LayerSpans) -> Option<Derived> {
        let overflow = |ck: &mut Checker, span: Span, what: &str| {
            ck.err(
                Diagnostic::error("E0501", span, format!("{what} overflows 64 bits"))
                    .label("this size is too large")
                    .note("moec computes every byte count exactly; no real GPU holds this much"),
            );
        };
        let world = m.nodes.checked_mul(m.gpus_per_node)?;
        let per_rank = m
            .experts_of_rank(l.experts.count)
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0) as u64;
        let act = l
            .tokens_per_rank
            .checked_mul(l.hidden)
            .and_then(|x| x.checked_mul(l.dtype.bytes()));
        let Some(act) = act else {
            overflow(self, spans.tokens, "tokens_per_rank × hidden × dtype bytes");
            return None;
        };
        let dispatch = l
            .tokens_per_rank
            .checked_mul(l.router.top_k)
            .and_then(|x| x.checked_mul(l.hidden))
            .and_then(|x| x.checked_mul(l.dispatch_dtype.bytes()));
        let Some(dispatch) = dispatch else {
            overflow(
                self,
                spans.tokens,
                "tokens_per_rank × top_k × hidden × dispatch bytes",
            );
            return None;
        };
        let bias_elems = if l.experts.bias {
            // gate and up biases of the intermediate size, the down bias of the hidden size.
            (l.experts.ffn.matrices() - 1)
                .checked_mul(l.experts.intermediate)
                .and_then(|x| x.checked_add(l.hidden))
        } else {
            Some(0)
        };
        let per_expert = l
            .experts
            .ffn
            .matrices()
            .checked_mul(l.hidden)
            .and_then(|x| x.checked_mul(l.experts.intermediate))
            .and_then(|x| x.checked_add(bias_elems?))
            .and_then(|x| x.checked_mul(l.dtype.bytes()));
        let total = per_expert.and_then(|x| x.checked_mul(l.experts.count));
        let rank_bytes = per_expert
            .and_then(|x| x.checked_mul(per_rank))
            .map(|x| x / m.etp.max(1));
        let (Some(total), Some(rank_bytes)) = (total, rank_bytes) else {
            overflow(self, spans.intermediate, "the expert weights' byte count");
            return None;
        };
        let group_tokens = l.tokens_per_rank.checked_mul(m.ep);
        let Some(group_tokens) = group_tokens else {
            overflow(self, spans.tokens, "tokens_per_rank × ep");
            return None;
        };
        let capacity = match l.capacity {
            Capacity::Dropless => None,
            Capacity::Limited {
                limit: CapacityLimit::Slots(n),
                ..
            } => Some(n),
            Capacity::Limited {
                limit: CapacityLimit::Factor(f),
                ..
            } => {
                let c = (f * group_tokens as f64 * l.router.top_k as f64 / l.experts.count as f64)
                    .ceil();
                if c.is_nan() || c >= 1.8e19 {
                    overflow(self, spans.tokens, "the capacity per expert");
                    return None;
                }
                Some((c as u64).max(1))
            }
        };
        Some(Derived {
            world_size: world,
            experts_per_rank_max: per_rank,
            tokens_per_ep_group: group_tokens,
            capacity_per_expert: capacity,
            activation_bytes_per_rank: act,
            dispatch_bytes_per_rank: dispatch,
            expert_weight_bytes_per_rank: rank_bytes,
            expert_weight_bytes_total: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_find_typos() {
        assert_eq!(suggest("hiden", ["hidden", "dtype"]), Some("hidden"));
        assert_eq!(suggest("topk", ["top_k", "scoring"]), Some("top_k"));
        assert_eq!(suggest("zzz", ["hidden"]), None);
    }
}
