//! The plan format: validation, JSON round trip and the text form.

use moec_runtime::plan::*;

fn op(id: u32, name: &str, phase: Phase, kind: OpKind, estimate_us: f64) -> Op {
    Op {
        id,
        name: name.to_string(),
        phase,
        chunk: None,
        kind,
        estimate_us,
    }
}

fn buffer(
    name: &str,
    dtype: DType,
    shape: &[u64],
    role: BufferRole,
    offset: u64,
    live: (u32, u32),
) -> Buffer {
    let elements: u64 = shape.iter().product();
    Buffer {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes: elements * dtype.bytes(),
        role,
        offset,
        live,
        chunk: None,
    }
}

fn kernel(name: &str, kind: KernelKind, constants: &[(&str, i64)]) -> Kernel {
    Kernel {
        name: name.to_string(),
        kind,
        constants: constants.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
    }
}

/// A small valid plan: 2 ranks, 4 experts, two streams with two record/wait
/// pairs, three kernels, three GEMMs, one all-to-all, arena reuse.
///
/// ```text
/// s0 compute: #0 router_gate, #1 router, #2 pack, #3 record e0, #7 wait e1, #8 expert_up, #9 expert_down, #10 unpermute
/// s1 comm:    #4 wait e0, #5 dispatch, #6 record e1
/// ```
fn valid_plan() -> Plan {
    use BufferRole::*;
    use DType::*;
    let buffers = vec![
        buffer("x", Bf16, &[16, 64], Input, 0, (0, 2)),
        buffer("logits", F32, &[16, 4], Scratch, 2048, (0, 1)),
        buffer("topk_ids", I32, &[16, 2], Scratch, 2304, (1, 2)),
        buffer("topk_weights", F32, &[16, 2], Scratch, 2432, (1, 10)),
        buffer("send", Bf16, &[64, 64], Comm, 2560, (2, 5)),
        buffer("recv", Bf16, &[64, 64], Comm, 10752, (5, 8)),
        // Reuses the bytes of `send`, which is dead after #5.
        buffer("h", Bf16, &[64, 32], Scratch, 2560, (8, 9)),
        // Reuses the bytes of `recv`, dead after #8.
        buffer("y", Bf16, &[64, 64], Scratch, 10752, (9, 10)),
        // Reuses the bytes of `x`, dead after #2.
        buffer("out", Bf16, &[16, 64], Output, 0, (10, 10)),
    ];
    let total: u64 = buffers.iter().map(|b| b.bytes).sum();
    let compute = Stream {
        name: "compute".to_string(),
        role: StreamRole::Compute,
        ops: vec![
            op(
                0,
                "router_gate",
                Phase::Router,
                OpKind::Gemm {
                    weight: GemmWeight::RouterGate,
                    a: 0,
                    c: 1,
                    m: 16,
                    n: 4,
                    k: 64,
                    groups: 1,
                    epilogue: Epilogue::None,
                },
                1.5,
            ),
            op(
                1,
                "router",
                Phase::Router,
                OpKind::Launch {
                    kernel: 0,
                    inputs: vec![1],
                    outputs: vec![2, 3],
                    rows: 16,
                },
                2.25,
            ),
            op(
                2,
                "pack",
                Phase::Permute,
                OpKind::Launch {
                    kernel: 1,
                    inputs: vec![0, 2],
                    outputs: vec![4],
                    rows: 16,
                },
                3.0,
            ),
            op(
                3,
                "packed",
                Phase::Permute,
                OpKind::Record { event: 0 },
                0.0,
            ),
            op(
                7,
                "wait_received",
                Phase::Experts,
                OpKind::Wait { event: 1 },
                0.0,
            ),
            op(
                8,
                "expert_up",
                Phase::Experts,
                OpKind::Gemm {
                    weight: GemmWeight::ExpertUp,
                    a: 5,
                    c: 6,
                    m: 32,
                    n: 64,
                    k: 64,
                    groups: 2,
                    epilogue: Epilogue::Activation,
                },
                12.5,
            ),
            op(
                9,
                "expert_down",
                Phase::Experts,
                OpKind::Gemm {
                    weight: GemmWeight::ExpertDown,
                    a: 6,
                    c: 7,
                    m: 32,
                    n: 64,
                    k: 32,
                    groups: 2,
                    epilogue: Epilogue::None,
                },
                6.75,
            ),
            op(
                10,
                "unpermute",
                Phase::Unpermute,
                OpKind::Launch {
                    kernel: 2,
                    inputs: vec![7, 3],
                    outputs: vec![8],
                    rows: 16,
                },
                2.0,
            ),
        ],
    };
    let mut dispatch = op(
        5,
        "dispatch",
        Phase::Dispatch,
        OpKind::Collective {
            kind: CollectiveKind::AllToAllV,
            scope: CollectiveScope::EpGroup,
            send: 4,
            recv: 5,
            peers: 1,
            bytes_per_peer: 4096,
            bytes_sent: 4096,
        },
        20.0,
    );
    dispatch.chunk = Some(0);
    let comm = Stream {
        name: "comm".to_string(),
        role: StreamRole::Comm,
        ops: vec![
            op(
                4,
                "wait_packed",
                Phase::Dispatch,
                OpKind::Wait { event: 0 },
                0.0,
            ),
            dispatch,
            op(
                6,
                "received",
                Phase::Dispatch,
                OpKind::Record { event: 1 },
                0.0,
            ),
        ],
    };
    Plan {
        version: PLAN_FORMAT_VERSION,
        layer: LayerConfig {
            name: "tiny".to_string(),
            hidden: 64,
            dtype: Bf16,
            dispatch_dtype: Bf16,
            tokens_per_rank: 16,
            experts: 4,
            intermediate: 32,
            ffn: Activation::Swiglu { limit: None },
            expert_bias: false,
            shared: None,
            router: RouterConfig {
                scoring: Scoring::Softmax,
                top_k: 2,
                logit_bias: false,
                softmax_over: SoftmaxOver::All,
                selection_bias: false,
                groups: None,
                normalize: true,
                scale: 1.0,
                weight_on: WeightOn::Output,
            },
            capacity: CapacityConfig::Dropless,
        },
        mesh: MeshConfig {
            nodes: 1,
            gpus_per_node: 2,
            ep: 2,
            etp: 1,
            dp: 1,
            device: DeviceConfig {
                name: "H100".to_string(),
                peak_flops: 989e12,
                memory_bandwidth: 3.35e12,
                memory: 80e9,
            },
            intra_node: LinkConfig {
                bandwidth: 450e9,
                latency: 2e-6,
            },
            inter_node: None,
            experts_of_ep_rank: vec![vec![0, 1], vec![2, 3]],
        },
        choices: Choices {
            chunks: 1,
            chunk_tokens: 16,
            fused_router: true,
            fused_permute: true,
            fused_combine: true,
            fused_activation: true,
            shared_concurrent: false,
            dispatch: A2aAlgorithm::Flat,
            dispatch_dtype: Bf16,
            expert_rows: 64,
            overflow_flag: true,
            dedup_dispatch: false,
            reduce_combine: false,
        },
        kernels: vec![
            kernel(
                "router_fused",
                KernelKind::RouterFused,
                &[("experts", 4), ("hidden", 64), ("top_k", 2)],
            ),
            kernel(
                "permute_pack",
                KernelKind::PermutePack,
                &[("hidden", 64), ("top_k", 2)],
            ),
            kernel(
                "unpermute_sum",
                KernelKind::UnpermuteWeightedSum,
                &[("hidden", 64), ("top_k", 2)],
            ),
        ],
        buffers,
        events: 2,
        streams: vec![compute, comm],
        memory: MemoryPlan {
            peak_activation_bytes: 18944,
            total_buffer_bytes: total,
            weight_bytes: 25088,
        },
    }
}

/// The error of a plan that must not validate, as text.
fn error(plan: &Plan) -> String {
    match plan.validate() {
        Ok(()) => panic!("the plan validated, expected an error"),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "multi-line message: {text}");
            assert!(text.starts_with("invalid plan: "), "{text}");
            text
        }
    }
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "`{part}` is not in: {text}");
    }
}

/// The op with this id, to mutate.
fn op_mut(plan: &mut Plan, id: u32) -> &mut Op {
    plan.streams
        .iter_mut()
        .flat_map(|s| s.ops.iter_mut())
        .find(|op| op.id == id)
        .unwrap_or_else(|| panic!("the plan has no op #{id}"))
}

#[test]
fn the_valid_plan_validates() {
    valid_plan().validate().unwrap();
}

#[test]
fn json_round_trip() {
    let plan = valid_plan();
    let json = plan.to_json();
    let back = Plan::from_json(&json).unwrap();
    assert_eq!(back, plan);
    assert_eq!(back.to_json(), json);
}

const EXPECTED_TEXT: &str = "\
moec plan v2: layer tiny
layer    hidden 64, bf16, 16 tokens per rank
         experts 4 x swiglu(32)
         router top-2 softmax over all experts, normalised, scale 1, weight on output
         shared none
         capacity dropless
mesh     1 node x 2 H100 = 2 ranks (ep 2, etp 1, dp 1)
         H100: 989 TFLOP/s, 3.35 TB/s, 80 GB memory
         intra-node 450 GB/s 2 us; inter-node none
         experts per EP rank: 2, contiguous (rank 0: 0-1; rank 1: 2-3)
choices  1 chunk of 16 tokens (no overlap)
         fused: router, permute into the pack, un-permute into the combine, activation into the GEMM epilogue
         dispatch flat, bf16 on the wire
         expert rows 64 per rank (dropless worst case; device overflow flag, no host sync)
kernels (3)
  k0  router_fused   router_fused            experts=4 hidden=64 top_k=2
  k1  permute_pack   permute_pack            hidden=64 top_k=2
  k2  unpermute_sum  unpermute_weighted_sum  hidden=64 top_k=2
buffers (9)
  b0  x             bf16  [16, 64]  2048 B  (2.00 KiB)  input    @0      ops 0..2
  b1  logits        f32   [16, 4]    256 B              scratch  @2048   ops 0..1
  b2  topk_ids      i32   [16, 2]    128 B              scratch  @2304   ops 1..2
  b3  topk_weights  f32   [16, 2]    128 B              scratch  @2432   ops 1..10
  b4  send          bf16  [64, 64]  8192 B  (8.00 KiB)  comm     @2560   ops 2..5
  b5  recv          bf16  [64, 64]  8192 B  (8.00 KiB)  comm     @10752  ops 5..8
  b6  h             bf16  [64, 32]  4096 B  (4.00 KiB)  scratch  @2560   ops 8..9
  b7  y             bf16  [64, 64]  8192 B  (8.00 KiB)  scratch  @10752  ops 9..10
  b8  out           bf16  [16, 64]  2048 B  (2.00 KiB)  output   @0      ops 10..10
streams (2), events (2)
  s0 compute: compute, 8 ops, 28.00 us
    #0   router_gate     1.50 us  router              gemm router_gate: b0 x -> b1 logits; m 16, n 4, k 64
    #1   router          2.25 us  router              launch k0 router_fused: b1 logits -> b2 topk_ids, b3 topk_weights; 16 rows
    #2   pack            3.00 us  permute             launch k1 permute_pack: b0 x, b2 topk_ids -> b4 send; 16 rows
    #3   packed          0.00 us  permute             record e0 (waited by #4 on s1 comm)
    #7   wait_received   0.00 us  experts             wait e1 (recorded by #6 on s1 comm)
    #8   expert_up      12.50 us  experts             gemm expert_up: b5 recv -> b6 h; 2 groups x m 32, n 64, k 64; activation in the epilogue
    #9   expert_down     6.75 us  experts             gemm expert_down: b6 h -> b7 y; 2 groups x m 32, n 64, k 32
    #10  unpermute       2.00 us  unpermute           launch k2 unpermute_sum: b7 y, b3 topk_weights -> b8 out; 16 rows
  s1 comm: comm, 3 ops, 20.00 us
    #4   wait_packed     0.00 us  dispatch            wait e0 (recorded by #3 on s0 compute)
    #5   dispatch       20.00 us  dispatch   chunk 0  all_to_all_v over ep_group: b4 send -> b5 recv; 1 peer, 4.00 KiB each, 4.00 KiB sent
    #6   received        0.00 us  dispatch            record e1 (waited by #7 on s0 compute)
memory   arena          18944 B  (18.50 KiB) per rank, the peak of live activations
         without reuse  33280 B  (32.50 KiB)
         weights        25088 B  (24.50 KiB) per rank
";

#[test]
fn text_form() {
    let plan = valid_plan();
    let text = plan.to_string();
    assert_eq!(text, plan.to_string(), "the text form is not stable");
    println!("{text}");
    assert_eq!(text, EXPECTED_TEXT);
    assert!(text.lines().all(|l| l == l.trim_end()), "trailing spaces");
}

#[test]
fn text_of_a_bigger_layer() {
    let mut plan = valid_plan();
    plan.layer.name = "big".to_string();
    plan.layer.experts = 256;
    plan.layer.dispatch_dtype = DType::Fp8E4m3;
    plan.layer.shared = Some(SharedConfig {
        count: 1,
        intermediate: 2048,
        ffn: Activation::Swiglu { limit: Some(7.0) },
        bias: true,
        sigmoid_gate: true,
    });
    plan.layer.router.scoring = Scoring::Sigmoid;
    plan.layer.router.top_k = 8;
    plan.layer.router.selection_bias = true;
    plan.layer.router.groups = Some(GroupConfig {
        count: 8,
        kept: 4,
        score: GroupScore::Top2Sum,
    });
    plan.layer.router.scale = 2.5;
    plan.layer.capacity = CapacityConfig::Limited {
        slots: 320,
        factor: Some(1.25),
        drop: DropPolicy::Probs,
    };
    plan.mesh.nodes = 8;
    plan.mesh.gpus_per_node = 8;
    plan.mesh.ep = 64;
    plan.mesh.inter_node = Some(LinkConfig {
        bandwidth: 50e9,
        latency: 10e-6,
    });
    plan.mesh.experts_of_ep_rank = (0..64u64).map(|r| (4 * r..4 * r + 4).collect()).collect();
    plan.choices.chunks = 3;
    plan.choices.chunk_tokens = 6;
    plan.choices.fused_permute = false;
    plan.choices.shared_concurrent = true;
    plan.choices.dispatch = A2aAlgorithm::Hierarchical;
    plan.choices.overflow_flag = false;
    let text = plan.to_string();
    assert_mentions(
        &text,
        &[
            "moec plan v2: layer big\n",
            "layer    hidden 64, bf16 (dispatch in fp8_e4m3), 16 tokens per rank\n",
            "router top-8 sigmoid + selection bias, groups 4 of 8 (top2_sum), normalised, scale 2.5, weight on output\n",
            "shared 1 x swiglu(2048, limit 7) with biases, sigmoid gate\n",
            "capacity 320 slots per expert per EP group (factor 1.25), drop by probs\n",
            "mesh     8 nodes x 8 H100 = 64 ranks (ep 64, etp 1, dp 1)\n",
            "intra-node 450 GB/s 2 us; inter-node 50 GB/s 10 us\n",
            "experts per EP rank: 4, contiguous (rank 0: 0-3; rank 1: 4-7; ...; rank 63: 252-255)\n",
            "choices  3 chunks of 6 tokens (last 4)\n",
            "fused: router, un-permute into the combine, activation into the GEMM epilogue; not fused: permute into the pack\n",
            "shared experts run concurrently with the dispatch\n",
            "dispatch hierarchical, bf16 on the wire\n",
            "expert rows 64 per rank (capacity)\n",
        ],
    );

    // Round-robin and irregular placements.
    plan.mesh.experts_of_ep_rank = (0..64u64)
        .map(|r| (0..4).map(|i| r + 64 * i).collect())
        .collect();
    assert_mentions(
        &plan.to_string(),
        &["experts per EP rank: 4, round-robin (rank 0: 0, 64, 128, 192; rank 1: 1, 65, 129, 193; ...; rank 63: 63, 127, 191, 255)\n"],
    );
    plan.mesh.experts_of_ep_rank[5].push(0);
    let text = plan.to_string();
    assert_mentions(
        &text,
        &[
            "experts per EP rank: 4 to 5 (primary copies first, then replicas)\n",
            "           ep rank 5   5, 69, 133, 197, 0\n",
            "           ep rank 3   3, 67, 131, 195\n           ... 1 more EP rank\n           ep rank 5   5, 69, 133, 197, 0\n           ... 56 more EP ranks\n           ep rank 62  62, 126, 190, 254\n",
            "           ep rank 63  63, 127, 191, 255\n",
        ],
    );
    assert!(text.lines().count() < 80, "{text}");
}

#[test]
fn text_never_panics_on_broken_plans() {
    let mut plan = valid_plan();
    plan.version = 99;
    plan.layer.name = "two\nlines".to_string();
    if let OpKind::Launch { kernel, inputs, .. } = &mut op_mut(&mut plan, 1).kind {
        *kernel = 7;
        inputs.push(17);
    }
    op_mut(&mut plan, 3).kind = OpKind::Wait { event: 9 };
    op_mut(&mut plan, 0).estimate_us = f64::NAN;
    plan.buffers[0].shape = vec![u64::MAX, u64::MAX];
    plan.buffers[0].bytes = u64::MAX;
    plan.mesh.experts_of_ep_rank = vec![vec![], (0..1000).step_by(2).collect()];
    plan.choices.chunks = 0;
    plan.layer.tokens_per_rank = u64::MAX;
    let text = plan.to_string();
    assert_mentions(
        &text,
        &[
            "moec plan v99: layer \"two\\nlines\"\n",
            "launch k?7: b1 logits, b?17 ->",
            "wait e?9 (never recorded)",
            "NaN us",
            "ep rank 0  none",
            "... (476 more ranges)",
        ],
    );

    // A plan with nothing in it.
    plan.kernels.clear();
    plan.buffers.clear();
    plan.streams.clear();
    plan.events = u32::MAX;
    plan.mesh.experts_of_ep_rank.clear();
    let text = plan.to_string();
    assert_mentions(
        &text,
        &[
            "kernels (0)\nbuffers (0)\nstreams (0), events (4294967295)\nmemory ",
            "experts per EP rank: none listed",
        ],
    );
}

#[test]
fn wrong_version() {
    let mut plan = valid_plan();
    plan.version = 7;
    let text = error(&plan);
    assert_eq!(
        plan.validate(),
        Err(PlanError::Version {
            found: 7,
            expected: 2
        })
    );
    assert_mentions(&text, &["version 7", "reads version 2", "rebuild the plan"]);
}

#[test]
fn unknown_buffer() {
    let mut plan = valid_plan();
    if let OpKind::Launch { inputs, .. } = &mut op_mut(&mut plan, 10).kind {
        inputs[1] = 99;
    }
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "op #10 `unpermute`",
            "b99",
            "`inputs`",
            "9 buffers (b0..b8)",
        ],
    );
}

#[test]
fn unknown_kernel() {
    let mut plan = valid_plan();
    if let OpKind::Launch { kernel, .. } = &mut op_mut(&mut plan, 1).kind {
        *kernel = 3;
    }
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #1 `router`", "kernel k3", "3 kernels (k0..k2)"],
    );
}

#[test]
fn unknown_event() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 7).kind = OpKind::Wait { event: 5 };
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #7 `wait_received`", "event e5", "2 events (e0..e1)"],
    );
}

#[test]
fn wait_for_an_event_never_recorded() {
    let mut plan = valid_plan();
    plan.events = 3;
    op_mut(&mut plan, 7).kind = OpKind::Wait { event: 2 };
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "op #7 `wait_received` (stream s0 `compute`)",
            "e2",
            "no op records",
        ],
    );
}

#[test]
fn event_never_recorded_nor_waited() {
    let mut plan = valid_plan();
    plan.events = 3;
    let text = error(&plan);
    assert_mentions(&text, &["event e2 is never recorded", "3 events"]);
}

#[test]
fn event_recorded_twice() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 6).kind = OpKind::Record { event: 0 };
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "event e0",
            "op #3 `packed`",
            "op #6 `received`",
            "exactly once",
        ],
    );
}

#[test]
fn wait_before_record_cycle_across_two_streams() {
    // s0 waits for e1 before it records e0; s1 waits for e0 before it records e1.
    let mut plan = valid_plan();
    op_mut(&mut plan, 3).kind = OpKind::Wait { event: 1 };
    op_mut(&mut plan, 7).kind = OpKind::Record { event: 0 };
    let err = plan.validate().unwrap_err();
    let PlanError::Deadlock { stuck } = &err else {
        panic!("expected a deadlock, got {err}");
    };
    assert_eq!(stuck.len(), 2);
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "deadlock",
            "stream s0 `compute` waits at op #3 `packed` for event e1, recorded later by op #6 `received` (stream s1 `comm`)",
            "stream s1 `comm` waits at op #4 `wait_packed` for event e0, recorded later by op #7 `wait_received` (stream s0 `compute`)",
        ],
    );
}

#[test]
fn wait_before_record_on_one_stream() {
    // s1 waits for e1 at #4 and records it only at #6.
    let mut plan = valid_plan();
    op_mut(&mut plan, 4).kind = OpKind::Wait { event: 1 };
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "deadlock",
            "stream s0 `compute` waits at op #7 `wait_received` for event e1, recorded later by op #6 `received` (stream s1 `comm`)",
            "stream s1 `comm` waits at op #4 `wait_packed` for event e1, recorded later by op #6",
        ],
    );
}

#[test]
fn duplicate_op_id() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 10).id = 9;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #9 `unpermute`", "op #9 `expert_down`", "unique"],
    );
}

#[test]
fn ids_decrease_along_a_stream() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 3).id = 11;
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "op #7 `wait_received`",
            "follows op #11 `packed`",
            "increase",
        ],
    );
}

#[test]
fn wait_id_before_record_id() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 6).id = 11;
    let text = error(&plan);
    assert_mentions(&text, &["op #7 `wait_received`", "e1", "op #11 `received`"]);
    assert!(matches!(
        plan.validate(),
        Err(PlanError::WaitBeforeRecord { event: 1, .. })
    ));
}

#[test]
fn bytes_mismatch() {
    let mut plan = valid_plan();
    plan.buffers[0].bytes = 2047;
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "buffer b0 `x`",
            "bf16 [16, 64]",
            "expected 2048 bytes, found 2047",
        ],
    );
}

#[test]
fn fp8_bytes_include_block_scales() {
    let mut plan = valid_plan();
    // 64 rows x 64 columns: 4096 bytes of fp8 plus one (partial) 128-element
    // block per row, 64 x 4 bytes of scales.
    plan.buffers[4].dtype = DType::Fp8E4m3;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["buffer b4 `send`", "expected 4352 bytes, found 8192"],
    );
    plan.buffers[4].bytes = 4352;
    plan.memory.total_buffer_bytes -= 8192 - 4352;
    plan.validate().unwrap();
}

#[test]
fn bytes_overflow_is_an_error() {
    let mut plan = valid_plan();
    plan.buffers[2].shape = vec![u64::MAX, 2];
    let text = error(&plan);
    assert_mentions(&text, &["buffer b2 `topk_ids`", "overflows"]);
}

#[test]
fn overlapping_arena_for_overlapping_lifetimes() {
    let mut plan = valid_plan();
    plan.buffers[6].offset = 10752;
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "buffer b5 `recv`",
            "buffer b6 `h`",
            "[10752, 18944)",
            "[10752, 14848)",
            "both are live",
        ],
    );
}

#[test]
fn buffer_past_the_arena() {
    let mut plan = valid_plan();
    plan.memory.peak_activation_bytes = 18943;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["buffer b5 `recv`", "[10752, 18944)", "arena of 18943 bytes"],
    );
}

#[test]
fn live_range_not_covering_an_op() {
    let mut plan = valid_plan();
    plan.buffers[1].live = (1, 1);
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #0 `router_gate`", "buffer b1 `logits`", "ops 1..1"],
    );
}

#[test]
fn mesh_size_mismatch() {
    let mut plan = valid_plan();
    plan.mesh.ep = 4;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["mesh.ep", "4 x 1 x 1 = 4", "1 nodes x 2 GPUs = 2 ranks"],
    );
}

#[test]
fn nan_estimate() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 5).estimate_us = f64::NAN;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #5 `dispatch` (stream s1 `comm`)", "estimate_us is NaN"],
    );
}

#[test]
fn dropless_without_overflow_flag() {
    let mut plan = valid_plan();
    plan.choices.overflow_flag = false;
    let text = error(&plan);
    assert_eq!(plan.validate(), Err(PlanError::DroplessWithoutOverflowFlag));
    assert_mentions(&text, &["choices.overflow_flag", "dropless"]);
}

#[test]
fn layer_and_mesh_sanity() {
    type Case = (fn(&mut Plan), &'static [&'static str]);
    let cases: Vec<Case> = vec![
        (|p| p.layer.hidden = 0, &["layer.hidden", "is 0"]),
        (
            |p| p.layer.router.top_k = 5,
            &["layer.router.top_k", "is 5", "1..=4"],
        ),
        (|p| p.layer.dtype = DType::I32, &["layer.dtype", "i32"]),
        (
            |p| p.mesh.device.peak_flops = f64::INFINITY,
            &["mesh.device.peak_flops", "inf"],
        ),
        (
            |p| p.mesh.intra_node.latency = -1.0,
            &["mesh.intra_node.latency", "-1", ">= 0"],
        ),
        (
            |p| p.mesh.experts_of_ep_rank.pop().map(drop).unwrap_or(()),
            &["mesh.experts_of_ep_rank", "1 entries", "(2)"],
        ),
        (
            |p| p.mesh.experts_of_ep_rank[1] = vec![2, 4],
            &["mesh.experts_of_ep_rank[1]", "expert 4"],
        ),
        (
            |p| p.mesh.experts_of_ep_rank[1] = vec![2],
            &["expert 3 to no EP rank"],
        ),
        (
            |p| p.mesh.experts_of_ep_rank[1] = vec![2, 3, 2],
            &["mesh.experts_of_ep_rank[1]", "expert 2 twice"],
        ),
        (
            |p| p.choices.chunk_tokens = 7,
            &["choices.chunk_tokens", "16"],
        ),
        (
            |p| {
                p.choices.chunks = 3;
                p.choices.chunk_tokens = 8;
            },
            &["choices.chunks", "non-empty last chunk"],
        ),
        (
            |p| {
                p.layer.capacity = CapacityConfig::Limited {
                    slots: 0,
                    factor: None,
                    drop: DropPolicy::Position,
                }
            },
            &["layer.capacity.slots", "is 0"],
        ),
        (
            |p| p.memory.total_buffer_bytes += 1,
            &["memory.total_buffer_bytes", "33280"],
        ),
        (
            |p| p.streams[1].name = "compute".to_string(),
            &["s0", "s1", "`compute`", "unique"],
        ),
        (|p| p.streams.clear(), &["no streams"]),
        (
            |p| p.kernels[0].constants.reverse(),
            &["kernels[0].constants", "`router_fused`", "sorted"],
        ),
    ];
    for (i, (mutate, parts)) in cases.into_iter().enumerate() {
        let mut plan = valid_plan();
        mutate(&mut plan);
        let text = error(&plan);
        assert!(
            parts.iter().all(|p| text.contains(p)),
            "case {i}: {text} lacks one of {parts:?}"
        );
    }
}

#[test]
fn from_json_rejects_garbage() {
    for (input, parts) in [
        (
            "this is not json",
            &["not a moec plan", "at line 1 column"][..],
        ),
        ("{}", &["not a moec plan", "missing field `version`"][..]),
        ("", &["not a moec plan", "EOF"][..]),
        ("[1, 2]", &["not a moec plan"][..]),
    ] {
        let err = Plan::from_json(input).unwrap_err();
        assert!(matches!(err, PlanError::Json(_)), "{input}: {err:?}");
        assert_mentions(&err.to_string(), parts);
    }
    let json = valid_plan().to_json();
    for cut in [1, json.len() / 3, json.len() / 2, json.len() - 1] {
        let err = Plan::from_json(&json[..cut]).unwrap_err();
        assert!(matches!(err, PlanError::Json(_)), "{err:?}");
        assert_mentions(&err.to_string(), &["not a moec plan", "EOF"]);
    }
    // An unknown field is named.
    let extra = json.replacen("\"version\"", "\"colour\": 1, \"version\"", 1);
    let err = Plan::from_json(&extra).unwrap_err();
    assert_mentions(&err.to_string(), &["unknown field `colour`"]);
}

#[test]
fn from_json_validates() {
    let mut plan = valid_plan();
    plan.version = 3;
    let err = Plan::from_json(&plan.to_json()).unwrap_err();
    assert_eq!(
        err,
        PlanError::Version {
            found: 3,
            expected: 2
        }
    );
    // The version is checked before the rest: a plan of another format
    // version whose fields changed still says to rebuild it.
    let future = plan
        .to_json()
        .replacen("\"version\"", "\"colour\": 1, \"version\"", 1);
    let err = Plan::from_json(&future).unwrap_err();
    assert_eq!(
        err,
        PlanError::Version {
            found: 3,
            expected: 2
        }
    );
    // serde_json writes a NaN as null, which does not read back as a number.
    plan.version = 2;
    op_mut(&mut plan, 0).estimate_us = f64::NAN;
    let err = Plan::from_json(&plan.to_json()).unwrap_err();
    assert!(matches!(err, PlanError::Json(_)), "{err:?}");
}

#[test]
fn plan_error_is_an_error() {
    fn takes(_: &dyn std::error::Error) {}
    takes(&PlanError::NoStreams);
}
