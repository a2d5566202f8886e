//! The timeline as a Chrome trace (JSON trace event format), for Perfetto
//! (<https://ui.perfetto.dev>) or `chrome://tracing`.
//!
//! One process (pid 0) stands for rank 0; every rank has the same timeline
//! under uniform routing. One thread per stream (tid = stream index, named
//! after the stream, sorted in plan order). One complete event (`"ph": "X"`)
//! per span, with the phase as category and the op's details in `args`; one
//! thread-scoped instant event (`"ph": "i"`, category `sync`) per record and
//! wait. Times are microseconds rounded to nanoseconds, so the output is
//! stable byte for byte.

use super::{round3, SyncKind, Timeline};
use moec_runtime::plan::{Op, OpKind, Plan};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The Chrome trace JSON of a simulated plan: one event per line.
pub fn chrome_trace(plan: &Plan, timeline: &Timeline) -> String {
    let ops: BTreeMap<u32, &Op> = plan.ops().map(|(_, op)| (op.id, op)).collect();
    let mut events: Vec<Value> = Vec::new();

    events.push(json!({
        "name": "process_name", "ph": "M", "pid": 0, "tid": 0,
        "args": {"name": format!(
            "rank 0 (all {} ranks identical under uniform routing)",
            plan.mesh.world_size()
        )},
    }));
    events.push(json!({
        "name": "process_sort_index", "ph": "M", "pid": 0, "tid": 0,
        "args": {"sort_index": 0},
    }));
    for (tid, name) in timeline.stream_names.iter().enumerate() {
        events.push(json!({
            "name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
            "args": {"name": name},
        }));
        events.push(json!({
            "name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid,
            "args": {"sort_index": tid},
        }));
    }

    for span in &timeline.spans {
        let mut args = Map::new();
        args.insert("op_id".into(), json!(span.op_id));
        args.insert("phase".into(), json!(span.phase.name()));
        if let Some(chunk) = span.chunk {
            args.insert("chunk".into(), json!(chunk));
        }
        if let Some(op) = ops.get(&span.op_id) {
            op_args(plan, op, &mut args);
        }
        events.push(json!({
            "name": span.name,
            "cat": span.phase.name(),
            "ph": "X",
            "ts": round3(span.start_us),
            "dur": round3(span.end_us - span.start_us),
            "pid": 0,
            "tid": span.stream,
            "args": Value::Object(args),
        }));
    }

    for sync in &timeline.syncs {
        let verb = match sync.kind {
            SyncKind::Record => "record",
            SyncKind::Wait => "wait",
        };
        events.push(json!({
            "name": format!("{verb} event {}", sync.event),
            "cat": "sync",
            "ph": "i",
            "s": "t",
            "ts": round3(sync.time_us),
            "pid": 0,
            "tid": sync.stream,
            "args": {"op_id": sync.op_id, "event": sync.event},
        }));
    }

    let other = json!({
        "generator": "moec",
        "layer": plan.layer.name,
        "world_size": plan.mesh.world_size(),
        "ep": plan.mesh.ep,
        "etp": plan.mesh.etp,
        "dp": plan.mesh.dp,
        "chunks": plan.choices.chunks,
        "total_us": round3(timeline.total_us),
    });

    let mut out = String::from("{\"traceEvents\": [\n");
    for (i, event) in events.iter().enumerate() {
        out.push_str("  ");
        out.push_str(&event.to_string());
        if i + 1 < events.len() {
            out.push(',');
        }
        out.push('\n');
    }
    out.push_str("],\n\"displayTimeUnit\": \"ns\",\n\"otherData\": ");
    out.push_str(&other.to_string());
    out.push_str("}\n");
    out
}

/// What the trace shows of an op beyond its name and phase.
fn op_args(plan: &Plan, op: &Op, args: &mut Map<String, Value>) {
    match &op.kind {
        OpKind::Launch { kernel, rows, .. } => {
            args.insert("kind".into(), json!("launch"));
            if let Some(k) = plan.kernels.get(*kernel as usize) {
                args.insert("kernel".into(), json!(k.name));
            }
            args.insert("rows".into(), json!(rows));
        }
        OpKind::Gemm {
            weight,
            m,
            n,
            k,
            groups,
            ..
        } => {
            args.insert("kind".into(), json!("gemm"));
            args.insert("weight".into(), json!(weight));
            args.insert("m".into(), json!(m));
            args.insert("n".into(), json!(n));
            args.insert("k".into(), json!(k));
            args.insert("groups".into(), json!(groups));
        }
        OpKind::Collective {
            kind,
            scope,
            peers,
            bytes_per_peer,
            bytes_sent,
            ..
        } => {
            args.insert("kind".into(), json!(kind));
            args.insert("scope".into(), json!(scope));
            args.insert("peers".into(), json!(peers));
            args.insert("bytes_per_peer".into(), json!(bytes_per_peer));
            args.insert("bytes".into(), json!(bytes_sent));
        }
        OpKind::Record { .. } | OpKind::Wait { .. } => {}
    }
    args.insert("estimate_us".into(), json!(round3(op.estimate_us)));
}

#[cfg(test)]
mod tests {
    use super::super::simulate;
    use super::super::test_plan::pipeline;
    use super::*;

    #[test]
    fn parses_and_has_one_x_event_per_span() {
        let plan = pipeline();
        let t = simulate(&plan).expect("simulates");
        let text = chrome_trace(&plan, &t);
        let v: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["displayTimeUnit"], "ns");
        let events = v["traceEvents"].as_array().expect("array");
        let of = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
        assert_eq!(of("X"), t.spans.len());
        assert_eq!(of("i"), t.syncs.len());
        assert_eq!(of("M"), 2 + 2 * plan.streams.len());
        let process = events
            .iter()
            .find(|e| e["name"] == "process_name")
            .expect("process name");
        assert_eq!(
            process["args"]["name"],
            "rank 0 (all 4 ranks identical under uniform routing)"
        );
        let thread = events
            .iter()
            .find(|e| e["name"] == "thread_name" && e["tid"] == 1)
            .expect("thread name");
        assert_eq!(thread["args"]["name"], "comm");

        let dispatch = events
            .iter()
            .find(|e| e["name"] == "dispatch")
            .expect("dispatch");
        assert_eq!(dispatch["ph"], "X");
        assert_eq!(dispatch["cat"], "dispatch");
        assert_eq!(dispatch["ts"], 10.0);
        assert_eq!(dispatch["dur"], 25.0);
        assert_eq!(dispatch["tid"], 1);
        assert_eq!(dispatch["args"]["chunk"], 0);
        assert_eq!(dispatch["args"]["bytes"], 1 << 20);
        assert_eq!(dispatch["args"]["kind"], "all_to_all_v");

        let gemm = events
            .iter()
            .find(|e| e["name"] == "experts_up")
            .expect("gemm");
        assert_eq!(gemm["args"]["m"], 32);
        assert_eq!(gemm["args"]["n"], 256);
        assert_eq!(gemm["args"]["k"], 64);
        let launch = events
            .iter()
            .find(|e| e["name"] == "router")
            .expect("launch");
        assert_eq!(launch["args"]["kernel"], "router_fused");
        assert!(launch["args"].get("chunk").is_none());

        assert_eq!(v["otherData"]["total_us"], 80.0);
        assert_eq!(v["otherData"]["layer"], plan.layer.name.as_str());
    }

    #[test]
    fn deterministic() {
        let plan = pipeline();
        let t = simulate(&plan).expect("simulates");
        assert_eq!(chrome_trace(&plan, &t), chrome_trace(&plan, &t));
        let t2 = simulate(&plan).expect("simulates");
        assert_eq!(chrome_trace(&plan, &t), chrome_trace(&plan, &t2));
    }
}
