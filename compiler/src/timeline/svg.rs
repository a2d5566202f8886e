//! A Gantt chart of one or more timelines as a standalone SVG.
//!
//! Layout, top to bottom: the title, a legend of the phases that occur (one
//! swatch per phase), then one panel per timeline. A panel has a header (label,
//! total time, exposed communication, and for every panel after the first its
//! time relative to the first), one lane per stream (a grey background rect,
//! labelled with the stream name and role), one rect per span coloured by phase
//! with a `<title>` tooltip and, when the bar is wide enough, its chunk number,
//! vertical grid lines at the axis ticks, a dashed line at the panel's end and
//! an x axis. All panels share one time axis, scaled to the longest total, so
//! the gain of overlap shows as a shorter chart.
//!
//! Rect elements: 1 (the background) + one per legend phase + per panel one per
//! lane and one per span. Floats are printed with fixed decimals, so the same
//! input gives the same bytes.

use super::{human_bytes, Timeline};
use moec_runtime::plan::{Op, OpKind, Phase, Plan, StreamRole};
use std::collections::BTreeMap;
use std::fmt::Write;

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 180.0;
const RIGHT: f64 = 40.0;
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
const LANE_H: f64 = 22.0;
const LANE_GAP: f64 = 6.0;

/// Fill colour of a phase (Tableau 10, readable on white) and the colour of
/// text drawn on it.
pub fn phase_color(phase: Phase) -> (&'static str, &'static str) {
    match phase {
        Phase::Router => ("#4e79a7", "#ffffff"),
        Phase::Permute => ("#f28e2b", "#000000"),
        Phase::Dispatch => ("#e15759", "#ffffff"),
        Phase::Experts => ("#59a14f", "#ffffff"),
        Phase::Combine => ("#b07aa1", "#ffffff"),
        Phase::Unpermute => ("#edc948", "#000000"),
        Phase::Shared => ("#76b7b2", "#000000"),
        Phase::Output => ("#9c755f", "#ffffff"),
    }
}

/// Escapes text for SVG content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate with 2 decimals; never `NaN`, `inf` or `-0.00`.
fn num(x: f64) -> String {
    let x = if x.is_finite() { x } else { 0.0 };
    let s = format!("{x:.2}");
    if s == "-0.00" {
        "0.00".to_string()
    } else {
        s
    }
}

/// A duration for people: `812.40 us` or `1.250 ms`.
fn duration(us: f64) -> String {
    let us = if us.is_finite() { us } else { 0.0 };
    if us >= 1000.0 {
        format!("{:.3} ms", us / 1000.0)
    } else {
        format!("{us:.2} us")
    }
}

/// A round tick step (1, 2 or 5 times a power of ten) giving about 8 ticks.
fn tick_step(max_us: f64) -> f64 {
    if !(max_us.is_finite() && max_us > 0.0) {
        return 1.0;
    }
    let raw = max_us / 8.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let normalized = raw / magnitude;
    let nice = if normalized <= 1.0 {
        1.0
    } else if normalized <= 2.0 {
        2.0
    } else if normalized <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Decimals needed to print multiples of `step` exactly.
fn decimals(step: f64) -> usize {
    if !(step.is_finite() && step > 0.0) || step >= 1.0 {
        return 0;
    }
    let d = (-step.log10() - 1e-9).ceil();
    if d.is_finite() && d > 0.0 {
        (d as usize).min(9)
    } else {
        0
    }
}

/// Tick positions (us) and labels for an axis from 0 to `max_us`.
fn ticks(max_us: f64) -> Vec<(f64, String)> {
    let step = tick_step(max_us);
    let in_ms = max_us.is_finite() && max_us >= 1000.0;
    let (unit, div) = if in_ms { ("ms", 1000.0) } else { ("us", 1.0) };
    let places = decimals(step / div);
    let count = if max_us.is_finite() && max_us > 0.0 {
        ((max_us / step) + 1e-9).floor() as usize
    } else {
        0
    };
    (0..=count.min(1000))
        .map(|i| {
            let t = i as f64 * step;
            let label = if i == 0 {
                "0".to_string()
            } else {
                format!("{:.*} {unit}", places, t / div)
            };
            (t, label)
        })
        .collect()
}

fn role_name(role: Option<&StreamRole>) -> &'static str {
    match role {
        Some(StreamRole::Compute) => "compute",
        Some(StreamRole::Comm) => "comm",
        None => "stream",
    }
}

/// What the tooltip says about an op beyond name, phase and times.
fn op_detail(op: &Op) -> String {
    match &op.kind {
        OpKind::Collective {
            kind,
            peers,
            bytes_sent,
            ..
        } => {
            let kind = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!(
                "\n{kind}, {} sent to {peers} peers",
                human_bytes(*bytes_sent)
            )
        }
        OpKind::Gemm {
            m, n, k, groups, ..
        } => format!("\ngemm m={m} n={n} k={k} groups={groups}"),
        OpKind::Launch { rows, .. } => format!("\nkernel over {rows} rows"),
        OpKind::Record { .. } | OpKind::Wait { .. } => String::new(),
    }
}

/// A standalone SVG Gantt chart of the panels `(label, plan, timeline)`, all on
/// the same time axis (see the module documentation for the layout).
pub fn gantt_svg(title: &str, panels: &[(&str, &Plan, &Timeline)]) -> String {
    let max_total = panels
        .iter()
        .map(|(_, _, t)| t.total_us)
        .filter(|t| t.is_finite())
        .fold(0.0f64, f64::max);
    let scale = if max_total > 0.0 {
        PLOT_W / max_total
    } else {
        0.0
    };
    let x_of = |us: f64| LEFT + us.clamp(0.0, max_total.max(0.0)) * scale;
    let ticks = ticks(max_total);

    let mut body = String::new();
    // Title.
    let _ = writeln!(
        body,
        r#"<text x="{}" y="28.00" font-size="18" font-weight="bold">{}</text>"#,
        num(16.0),
        escape(title)
    );

    // Legend: the phases of any panel, in pipeline order.
    let present: Vec<Phase> = Phase::ALL
        .iter()
        .copied()
        .filter(|&p| {
            panels
                .iter()
                .any(|(_, _, t)| t.spans.iter().any(|s| s.phase == p))
        })
        .collect();
    let mut lx = LEFT;
    for &phase in &present {
        let (fill, _) = phase_color(phase);
        let _ = writeln!(
            body,
            r#"<rect x="{}" y="40.00" width="12.00" height="12.00" fill="{fill}"/>"#,
            num(lx)
        );
        let _ = writeln!(
            body,
            r#"<text x="{}" y="50.50" font-size="12">{}</text>"#,
            num(lx + 16.0),
            phase.name()
        );
        lx += 16.0 + 7.0 * phase.name().len() as f64 + 18.0;
    }

    let mut y = 64.0;
    let first_total = panels.first().map(|(_, _, t)| t.total_us).unwrap_or(0.0);
    let first_label = panels.first().map(|(l, _, _)| *l).unwrap_or("");
    for (index, (label, plan, timeline)) in panels.iter().enumerate() {
        let ops: BTreeMap<u32, &Op> = plan.ops().map(|(_, op)| (op.id, op)).collect();
        let lanes = timeline.stream_names.len();

        // Header.
        let exposed_comm: f64 = timeline
            .phases
            .iter()
            .filter(|p| matches!(p.phase, Phase::Dispatch | Phase::Combine))
            .map(|p| p.exposed_us)
            .sum();
        let mut header = format!(
            "{label} \u{2014} total {}, exposed communication {}",
            duration(timeline.total_us),
            duration(exposed_comm)
        );
        if index > 0 && first_total > 0.0 && timeline.total_us.is_finite() {
            let _ = write!(
                header,
                " \u{2014} {:.2}x the time of {first_label}",
                timeline.total_us / first_total
            );
        }
        let _ = writeln!(
            body,
            r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
            num(16.0),
            num(y + 18.0),
            escape(&header)
        );
        let top = y + 28.0;
        let lane_y = |lane: usize| top + lane as f64 * (LANE_H + LANE_GAP);
        let bottom = lane_y(lanes) - LANE_GAP;

        // Lanes.
        for (lane, name) in timeline.stream_names.iter().enumerate() {
            let ly = lane_y(lane);
            let _ = writeln!(
                body,
                r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#f2f2f2"/>"##,
                num(LEFT),
                num(ly),
                num(PLOT_W),
                num(LANE_H)
            );
            // The role, unless the name already says it.
            let role = role_name(timeline.stream_roles.get(lane));
            let role = if name == role {
                String::new()
            } else {
                format!(r##" <tspan fill="#888888">({role})</tspan>"##)
            };
            let _ = writeln!(
                body,
                r#"<text x="{}" y="{}" font-size="12" text-anchor="end">{}{role}</text>"#,
                num(LEFT - 8.0),
                num(ly + LANE_H / 2.0 + 4.0),
                escape(name),
            );
        }

        // Grid lines at the ticks.
        for (t, _) in &ticks {
            let _ = writeln!(
                body,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#d0d0d0" stroke-width="0.50"/>"##,
                num(top),
                num(bottom),
                x = num(x_of(*t))
            );
        }

        // Bars.
        for span in &timeline.spans {
            if span.stream >= lanes {
                continue;
            }
            let (fill, ink) = phase_color(span.phase);
            let x = x_of(span.start_us);
            let w = (x_of(span.end_us) - x).max(0.5);
            let ly = lane_y(span.stream) + 2.0;
            let h = LANE_H - 4.0;
            let mut tip = format!(
                "{} ({}{})\nstart {:.3} us, duration {:.3} us",
                span.name,
                span.phase.name(),
                span.chunk
                    .map(|c| format!(", chunk {c}"))
                    .unwrap_or_default(),
                span.start_us,
                span.end_us - span.start_us
            );
            if let Some(op) = ops.get(&span.op_id) {
                tip.push_str(&op_detail(op));
            }
            let _ = writeln!(
                body,
                r##"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}" stroke="#ffffff" stroke-width="0.50"><title>{}</title></rect>"##,
                num(x),
                num(ly),
                num(w),
                num(h),
                escape(&tip)
            );
            if let Some(chunk) = span.chunk {
                let text = chunk.to_string();
                if w >= 7.0 * text.len() as f64 + 6.0 {
                    let _ = writeln!(
                        body,
                        r#"<text x="{}" y="{}" font-size="10" text-anchor="middle" fill="{ink}" pointer-events="none">{text}</text>"#,
                        num(x + w / 2.0),
                        num(ly + h / 2.0 + 3.5)
                    );
                }
            }
        }

        // The end of this timeline.
        let end_x = x_of(timeline.total_us);
        let _ = writeln!(
            body,
            r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#333333" stroke-width="1.00" stroke-dasharray="4 3"/>"##,
            num(top - 4.0),
            num(bottom + 4.0),
            x = num(end_x)
        );

        // Axis.
        let axis_y = bottom + 4.0;
        let _ = writeln!(
            body,
            r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#333333" stroke-width="1.00"/>"##,
            num(LEFT),
            num(LEFT + PLOT_W),
            y = num(axis_y)
        );
        for (t, label) in &ticks {
            let x = x_of(*t);
            let _ = writeln!(
                body,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#333333" stroke-width="1.00"/>"##,
                num(axis_y),
                num(axis_y + 4.0),
                x = num(x)
            );
            let _ = writeln!(
                body,
                r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
                num(x),
                num(axis_y + 15.0),
                escape(label)
            );
        }
        y = axis_y + 28.0;
    }

    let height = y + 4.0;
    let mut out = String::new();
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif">"#,
        w = num(WIDTH),
        h = num(height)
    );
    let _ = writeln!(out, "<title>{}</title>", escape(title));
    let _ = writeln!(
        out,
        r##"<rect x="0.00" y="0.00" width="{}" height="{}" fill="#ffffff"/>"##,
        num(WIDTH),
        num(height)
    );
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::simulate;
    use super::super::test_plan::{pipeline, Builder};
    use super::*;

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    /// A no-overlap version of the pipeline: everything on one compute stream
    /// and one comm stream, strictly in turn.
    fn serial() -> Plan {
        let mut b = Builder::new();
        let c = b.stream("compute", StreamRole::Compute);
        let n = b.stream("comm", StreamRole::Comm);
        b.launch(c, "router", Phase::Router, None, 10.0);
        b.gemm(c, "shared_up", Phase::Shared, None, 30.0);
        b.record(c, 0);
        b.wait(n, 0);
        b.collective(n, "dispatch", Phase::Dispatch, Some(0), 25.0, 1 << 20);
        b.record(n, 1);
        b.wait(c, 1);
        b.gemm(c, "experts_up", Phase::Experts, Some(0), 20.0);
        b.record(c, 2);
        b.wait(n, 2);
        b.collective(n, "combine", Phase::Combine, Some(0), 15.0, 1 << 19);
        b.record(n, 3);
        b.wait(c, 3);
        b.launch(c, "output", Phase::Output, None, 5.0);
        b.build()
    }

    #[test]
    fn one_bar_per_span_and_well_formed() {
        let plan = pipeline();
        let t = simulate(&plan).expect("simulates");
        let base_plan = serial();
        let base = simulate(&base_plan).expect("simulates");
        assert_eq!(base.total_us, 105.0);
        let svg = gantt_svg(
            "Tiny <MoE> & 'co'",
            &[("chosen", &plan, &t), ("no overlap", &base_plan, &base)],
        );
        assert!(svg.starts_with("<?xml"));
        assert_eq!(count(&svg, "<svg"), 1);
        assert_eq!(count(&svg, "</svg>"), 1);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Bars carry a tooltip each.
        let bars = t.spans.len() + base.spans.len();
        assert_eq!(count(&svg, "<title>"), 1 + bars);
        assert_eq!(count(&svg, "<title>"), count(&svg, "</title>"));
        let lanes = t.stream_names.len() + base.stream_names.len();
        let legend = 6; // router dispatch experts combine shared output
        assert_eq!(count(&svg, "<rect"), 1 + legend + lanes + bars);
        assert_eq!(count(&svg, "<text"), count(&svg, "</text>"));
        assert_eq!(count(&svg, "<tspan"), count(&svg, "</tspan>"));
        // Escaped title, no raw specials inside text.
        assert!(svg.contains("Tiny &lt;MoE&gt; &amp; &apos;co&apos;"));
        assert!(!svg.contains("<MoE>"));
        // Headers and the gain.
        assert!(svg.contains("chosen \u{2014} total 80.00 us"));
        assert!(svg.contains("no overlap \u{2014} total 105.00 us"));
        assert!(svg.contains("1.31x the time of chosen"));
        // Same axis: the longest panel ends at the right edge.
        assert!(svg.contains(&format!(r#"x1="{}""#, num(LEFT + PLOT_W))));
        // Tooltip content.
        assert!(svg.contains("dispatch (dispatch, chunk 0)\nstart 10.000 us, duration 25.000 us"));
        assert!(svg.contains("all_to_all_v, 1.00 MiB sent to 4 peers"));
        // Chunk numbers in wide bars.
        assert!(svg.contains(r#"pointer-events="none">0</text>"#));
        // Every tag is closed or self-closed: the number of '<' equals the
        // number of '>' (text never holds a raw one).
        assert_eq!(count(&svg, "<"), count(&svg, ">"));
    }

    #[test]
    fn deterministic() {
        let plan = pipeline();
        let t = simulate(&plan).expect("simulates");
        let a = gantt_svg("t", &[("a", &plan, &t)]);
        let t2 = simulate(&plan).expect("simulates");
        let b = gantt_svg("t", &[("a", &plan, &t2)]);
        assert_eq!(a, b);
    }

    #[test]
    fn empty_inputs_stay_valid() {
        let svg = gantt_svg("nothing", &[]);
        assert_eq!(count(&svg, "<svg"), 1);
        assert!(svg.contains("</svg>"));
        let plan = Builder::new().build();
        let t = simulate(&plan).expect("simulates");
        let svg = gantt_svg("empty", &[("empty", &plan, &t)]);
        assert!(!svg.contains("NaN"));
        assert_eq!(count(&svg, "<rect"), 1);
    }

    #[test]
    fn ticks_are_round() {
        let labels = |max: f64| -> Vec<String> { ticks(max).into_iter().map(|(_, l)| l).collect() };
        assert_eq!(
            labels(80.0),
            ["0", "10 us", "20 us", "30 us", "40 us", "50 us", "60 us", "70 us", "80 us"]
        );
        assert_eq!(labels(3.0)[1], "0.5 us");
        assert_eq!(labels(2500.0)[1], "0.5 ms");
        assert_eq!(labels(12_000.0)[1], "2 ms");
        assert_eq!(labels(0.03)[1], "0.005 us");
        assert_eq!(labels(0.0), ["0"]);
        assert_eq!(tick_step(1000.0), 200.0);
        assert_eq!(
            escape(r#"a&b<c>"d"'e'"#),
            "a&amp;b&lt;c&gt;&quot;d&quot;&apos;e&apos;"
        );
    }
}
