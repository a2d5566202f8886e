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
        bound: None,
    }
}

/// The constants of the assignment pass `pass` of the valid plan's layer.
fn assign(pass: i64) -> [(&'static str, i64); 7] {
    [
        ("capacity", 0),
        ("dtype", 1),
        ("ep_ranks", 2),
        ("experts", 4),
        ("hidden", 64),
        ("pass", pass),
        ("top_k", 2),
    ]
}

fn kernel(name: &str, kind: KernelKind, constants: &[(&str, i64)]) -> Kernel {
    Kernel {
        name: name.to_string(),
        kind,
        constants: constants.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
    }
}

/// A small valid plan: 2 ranks, 4 experts, two streams with four
/// record/wait pairs, five kernels, three GEMMs, a count exchange and an
/// all-to-all, arena reuse.
///
/// ```text
/// s0 compute: #0 router_gate, #1 router, #2 assign_count, #3 record e0, #7 wait e1,
///             #8 assign_place, #9 pack, #10 record e2, #14 wait e3, #15 expert_up,
///             #16 expert_down, #17 unpermute
/// s1 comm:    #4 wait e0, #5 exchange, #6 record e1, #11 wait e2, #12 dispatch, #13 record e3
/// ```
fn valid_plan() -> Plan {
    use BufferRole::*;
    use DType::*;
    let buffers = vec![
        buffer("x", Bf16, &[16, 64], Input, 0, (0, 17)),
        buffer("out", Bf16, &[16, 64], Output, 2048, (0, 17)),
        buffer("logits", F32, &[16, 4], Scratch, 4096, (0, 1)),
        buffer("topk_ids", I32, &[16, 2], Scratch, 4352, (1, 8)),
        buffer("topk_weights", F32, &[16, 2], Scratch, 4480, (1, 17)),
        // Reuses the bytes of `logits`, dead after #1.
        buffer("assign_meta", I32, &[1, 4], Scratch, 4096, (2, 5)),
        buffer("assign_meta_all", I32, &[2, 4], Comm, 4608, (5, 8)),
        buffer("slots", I32, &[16, 2], Scratch, 4864, (8, 17)),
        buffer("overflow_flag", U8, &[1], Scratch, 4992, (8, 17)),
        buffer("send", Bf16, &[64, 64], Comm, 5120, (9, 12)),
        buffer("recv", Bf16, &[64, 64], Comm, 13312, (12, 15)),
        // Reuses the bytes of `send`, dead after #12.
        buffer("h", Bf16, &[64, 32], Scratch, 5120, (15, 16)),
        // Reuses the bytes of `recv`, dead after #15.
        buffer("y", Bf16, &[64, 64], Scratch, 13312, (16, 17)),
    ];
    let total: u64 = buffers.iter().map(|b| b.bytes).sum();
    let launch = |kernel: u32, inputs: &[u32], outputs: &[u32]| OpKind::Launch {
        kernel,
        inputs: inputs.to_vec(),
        outputs: outputs.to_vec(),
        rows: 16,
    };
    let gemm = |weight, a, c, m, n, k, groups, epilogue| OpKind::Gemm {
        weight,
        a,
        c,
        m,
        n,
        k,
        groups,
        epilogue,
        by_rank: None,
    };
    let compute = Stream {
        name: "compute".to_string(),
        role: StreamRole::Compute,
        ops: vec![
            op(
                0,
                "router_gate",
                Phase::Router,
                gemm(GemmWeight::RouterGate, 0, 2, 16, 4, 64, 1, Epilogue::None),
                1.5,
            ),
            op(1, "router", Phase::Router, launch(0, &[2], &[3, 4]), 2.25),
            op(
                2,
                "assign_count",
                Phase::Router,
                launch(1, &[3, 4], &[5]),
                1.0,
            ),
            op(
                3,
                "counted",
                Phase::Router,
                OpKind::Record { event: 0 },
                0.0,
            ),
            op(
                7,
                "wait_exchanged",
                Phase::Router,
                OpKind::Wait { event: 1 },
                0.0,
            ),
            op(
                8,
                "assign_place",
                Phase::Router,
                launch(2, &[3, 4, 6], &[7, 8]),
                1.0,
            ),
            op(9, "pack", Phase::Permute, launch(3, &[0, 7, 4], &[9]), 3.0),
            op(
                10,
                "packed",
                Phase::Permute,
                OpKind::Record { event: 2 },
                0.0,
            ),
            op(
                14,
                "wait_received",
                Phase::Experts,
                OpKind::Wait { event: 3 },
                0.0,
            ),
            op(
                15,
                "expert_up",
                Phase::Experts,
                gemm(
                    GemmWeight::ExpertUp,
                    10,
                    11,
                    32,
                    64,
                    64,
                    2,
                    Epilogue::Activation,
                ),
                12.5,
            ),
            op(
                16,
                "expert_down",
                Phase::Experts,
                gemm(
                    GemmWeight::ExpertDown,
                    11,
                    12,
                    32,
                    64,
                    32,
                    2,
                    Epilogue::None,
                ),
                6.75,
            ),
            op(
                17,
                "unpermute",
                Phase::Unpermute,
                launch(4, &[12, 7, 4], &[1]),
                2.0,
            ),
        ],
    };
    let mut dispatch = op(
        12,
        "dispatch",
        Phase::Dispatch,
        OpKind::Collective {
            kind: CollectiveKind::AllToAllV,
            scope: CollectiveScope::EpGroup,
            send: 9,
            recv: 10,
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
                "wait_counted",
                Phase::Router,
                OpKind::Wait { event: 0 },
                0.0,
            ),
            op(
                5,
                "exchange",
                Phase::Router,
                OpKind::Collective {
                    kind: CollectiveKind::CountExchange,
                    scope: CollectiveScope::EpGroup,
                    send: 5,
                    recv: 6,
                    peers: 1,
                    bytes_per_peer: 16,
                    bytes_sent: 16,
                },
                3.0,
            ),
            op(
                6,
                "exchanged",
                Phase::Router,
                OpKind::Record { event: 1 },
                0.0,
            ),
            op(
                11,
                "wait_packed",
                Phase::Dispatch,
                OpKind::Wait { event: 2 },
                0.0,
            ),
            dispatch,
            op(
                13,
                "received",
                Phase::Dispatch,
                OpKind::Record { event: 3 },
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
            rank_rows: 0,
            headroom: None,
            overflow_flag: true,
            dedup_dispatch: false,
            reduce_combine: false,
        },
        kernels: vec![
            kernel(
                "router_fused",
                KernelKind::RouterFused,
                &[
                    ("dtype", 1),
                    ("experts", 4),
                    ("group_score", 0),
                    ("groups", 1),
                    ("groups_kept", 1),
                    ("hidden", 64),
                    ("normalize", 1),
                    ("scoring", 0),
                    ("selection_bias", 0),
                    ("softmax_over", 0),
                    ("top_k", 2),
                ],
            ),
            kernel("assign_count", KernelKind::Assign, &assign(0)),
            kernel("assign_place", KernelKind::Assign, &assign(1)),
            kernel(
                "permute_pack",
                KernelKind::PermutePack,
                &[
                    ("dtype", 1),
                    ("hidden", 64),
                    ("top_k", 2),
                    ("weight_on_input", 0),
                ],
            ),
            kernel(
                "unpermute_sum",
                KernelKind::UnpermuteWeightedSum,
                &[
                    ("dtype", 1),
                    ("hidden", 64),
                    ("top_k", 2),
                    ("weight_on_input", 0),
                ],
            ),
        ],
        buffers,
        events: 4,
        streams: vec![compute, comm],
        memory: MemoryPlan {
            peak_activation_bytes: 21504,
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
moec plan v4: layer tiny
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
         expert rows 64 per rank and chunk (dropless worst case; device overflow flag, no host sync)
kernels (5)
  k0  router_fused   router_fused            dtype=1 experts=4 group_score=0 groups=1 groups_kept=1 hidden=64 normalize=1 scoring=0 selection_bias=0 softmax_over=0 top_k=2
  k1  assign_count   assign                  capacity=0 dtype=1 ep_ranks=2 experts=4 hidden=64 pass=0 top_k=2
  k2  assign_place   assign                  capacity=0 dtype=1 ep_ranks=2 experts=4 hidden=64 pass=1 top_k=2
  k3  permute_pack   permute_pack            dtype=1 hidden=64 top_k=2 weight_on_input=0
  k4  unpermute_sum  unpermute_weighted_sum  dtype=1 hidden=64 top_k=2 weight_on_input=0
buffers (13)
  b0   x                bf16  [16, 64]  2048 B  (2.00 KiB)  input    @0      ops 0..17
  b1   out              bf16  [16, 64]  2048 B  (2.00 KiB)  output   @2048   ops 0..17
  b2   logits           f32   [16, 4]    256 B              scratch  @4096   ops 0..1
  b3   topk_ids         i32   [16, 2]    128 B              scratch  @4352   ops 1..8
  b4   topk_weights     f32   [16, 2]    128 B              scratch  @4480   ops 1..17
  b5   assign_meta      i32   [1, 4]      16 B              scratch  @4096   ops 2..5
  b6   assign_meta_all  i32   [2, 4]      32 B              comm     @4608   ops 5..8
  b7   slots            i32   [16, 2]    128 B              scratch  @4864   ops 8..17
  b8   overflow_flag    u8    [1]          1 B              scratch  @4992   ops 8..17
  b9   send             bf16  [64, 64]  8192 B  (8.00 KiB)  comm     @5120   ops 9..12
  b10  recv             bf16  [64, 64]  8192 B  (8.00 KiB)  comm     @13312  ops 12..15
  b11  h                bf16  [64, 32]  4096 B  (4.00 KiB)  scratch  @5120   ops 15..16
  b12  y                bf16  [64, 64]  8192 B  (8.00 KiB)  scratch  @13312  ops 16..17
streams (2), events (4)
  s0 compute: compute, 12 ops, 30.00 us
    #0   router_gate      1.50 us  router              gemm router_gate: b0 x -> b2 logits; m 16, n 4, k 64
    #1   router           2.25 us  router              launch k0 router_fused: b2 logits -> b3 topk_ids, b4 topk_weights; 16 rows
    #2   assign_count     1.00 us  router              launch k1 assign_count: b3 topk_ids, b4 topk_weights -> b5 assign_meta; 16 rows
    #3   counted          0.00 us  router              record e0 (waited by #4 on s1 comm)
    #7   wait_exchanged   0.00 us  router              wait e1 (recorded by #6 on s1 comm)
    #8   assign_place     1.00 us  router              launch k2 assign_place: b3 topk_ids, b4 topk_weights, b6 assign_meta_all -> b7 slots, b8 overflow_flag; 16 rows
    #9   pack             3.00 us  permute             launch k3 permute_pack: b0 x, b7 slots, b4 topk_weights -> b9 send; 16 rows
    #10  packed           0.00 us  permute             record e2 (waited by #11 on s1 comm)
    #14  wait_received    0.00 us  experts             wait e3 (recorded by #13 on s1 comm)
    #15  expert_up       12.50 us  experts             gemm expert_up: b10 recv -> b11 h; 2 groups x m 32, n 64, k 64; activation in the epilogue
    #16  expert_down      6.75 us  experts             gemm expert_down: b11 h -> b12 y; 2 groups x m 32, n 64, k 32
    #17  unpermute        2.00 us  unpermute           launch k4 unpermute_sum: b12 y, b7 slots, b4 topk_weights -> b1 out; 16 rows
  s1 comm: comm, 6 ops, 23.00 us
    #4   wait_counted     0.00 us  router              wait e0 (recorded by #3 on s0 compute)
    #5   exchange         3.00 us  router              count_exchange over ep_group: b5 assign_meta -> b6 assign_meta_all; 1 peer, 16 B each, 16 B sent
    #6   exchanged        0.00 us  router              record e1 (waited by #7 on s0 compute)
    #11  wait_packed      0.00 us  dispatch            wait e2 (recorded by #10 on s0 compute)
    #12  dispatch        20.00 us  dispatch   chunk 0  all_to_all_v over ep_group: b9 send -> b10 recv; 1 peer, 4.00 KiB each, 4.00 KiB sent
    #13  received         0.00 us  dispatch            record e3 (waited by #14 on s0 compute)
memory   arena          21504 B  (21.00 KiB) per rank, the peak of live activations
         without reuse  33457 B  (32.67 KiB)
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
            "moec plan v4: layer big\n",
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
            "expert rows 64 per rank and chunk (capacity)\n",
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
            "launch k?7: b2 logits, b?17 ->",
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
            expected: 4
        })
    );
    assert_mentions(&text, &["version 7", "reads version 4", "rebuild the plan"]);
}

#[test]
fn unknown_buffer() {
    let mut plan = valid_plan();
    if let OpKind::Launch { inputs, .. } = &mut op_mut(&mut plan, 17).kind {
        inputs[1] = 99;
    }
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "op #17 `unpermute`",
            "b99",
            "`inputs`",
            "13 buffers (b0..b12)",
        ],
    );
}

#[test]
fn unknown_kernel() {
    let mut plan = valid_plan();
    if let OpKind::Launch { kernel, .. } = &mut op_mut(&mut plan, 1).kind {
        *kernel = 5;
    }
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #1 `router`", "kernel k5", "5 kernels (k0..k4)"],
    );
}

#[test]
fn unknown_event() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 7).kind = OpKind::Wait { event: 5 };
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #7 `wait_exchanged`", "event e5", "4 events (e0..e3)"],
    );
}

#[test]
fn wait_for_an_event_never_recorded() {
    let mut plan = valid_plan();
    plan.events = 5;
    op_mut(&mut plan, 7).kind = OpKind::Wait { event: 4 };
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "op #7 `wait_exchanged` (stream s0 `compute`)",
            "e4",
            "no op records",
        ],
    );
}

#[test]
fn event_never_recorded_nor_waited() {
    let mut plan = valid_plan();
    plan.events = 5;
    let text = error(&plan);
    assert_mentions(&text, &["event e4 is never recorded", "5 events"]);
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
            "op #3 `counted`",
            "op #6 `exchanged`",
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
            "stream s0 `compute` waits at op #3 `counted` for event e1, recorded later by op #6 `exchanged` (stream s1 `comm`)",
            "stream s1 `comm` waits at op #4 `wait_counted` for event e0, recorded later by op #7 `wait_exchanged` (stream s0 `compute`)",
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
            "stream s0 `compute` waits at op #7 `wait_exchanged` for event e1, recorded later by op #6 `exchanged` (stream s1 `comm`)",
            "stream s1 `comm` waits at op #4 `wait_counted` for event e1, recorded later by op #6",
        ],
    );
}

#[test]
fn duplicate_op_id() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 17).id = 16;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #16 `unpermute`", "op #16 `expert_down`", "unique"],
    );
}

#[test]
fn ids_decrease_along_a_stream() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 3).id = 20;
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "op #7 `wait_exchanged`",
            "follows op #20 `counted`",
            "increase",
        ],
    );
}

#[test]
fn wait_id_before_record_id() {
    let mut plan = valid_plan();
    op_mut(&mut plan, 13).id = 20;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #14 `wait_received`", "e3", "op #20 `received`"],
    );
    assert!(matches!(
        plan.validate(),
        Err(PlanError::WaitBeforeRecord { event: 3, .. })
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
    plan.buffers[9].dtype = DType::Fp8E4m3;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["buffer b9 `send`", "expected 4352 bytes, found 8192"],
    );
    plan.buffers[9].bytes = 4352;
    plan.memory.total_buffer_bytes -= 8192 - 4352;
    // The size is right now; the kernel that writes it still writes bf16.
    let text = error(&plan);
    assert_mentions(&text, &["op #9 `pack`", "b9 `send` (fp8_e4m3)", "is bf16"]);
}

#[test]
fn bytes_overflow_is_an_error() {
    let mut plan = valid_plan();
    plan.buffers[3].shape = vec![u64::MAX, 2];
    let text = error(&plan);
    assert_mentions(&text, &["buffer b3 `topk_ids`", "overflows"]);
}

#[test]
fn overlapping_arena_for_overlapping_lifetimes() {
    let mut plan = valid_plan();
    plan.buffers[11].offset = 13312;
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "buffer b10 `recv`",
            "buffer b11 `h`",
            "[13312, 21504)",
            "[13312, 17408)",
            "share arena bytes",
        ],
    );
}

#[test]
fn buffer_past_the_arena() {
    let mut plan = valid_plan();
    plan.memory.peak_activation_bytes = 21503;
    let text = error(&plan);
    assert_mentions(
        &text,
        &[
            "buffer b10 `recv`",
            "[13312, 21504)",
            "arena of 21503 bytes",
        ],
    );
}

#[test]
fn live_range_not_covering_an_op() {
    let mut plan = valid_plan();
    plan.buffers[2].live = (1, 1);
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #0 `router_gate`", "buffer b2 `logits`", "ops 1..1"],
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
    op_mut(&mut plan, 12).estimate_us = f64::NAN;
    let text = error(&plan);
    assert_mentions(
        &text,
        &["op #12 `dispatch` (stream s1 `comm`)", "estimate_us is NaN"],
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
            &["memory.total_buffer_bytes", "33457"],
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
    plan.version = 5;
    let err = Plan::from_json(&plan.to_json()).unwrap_err();
    assert_eq!(
        err,
        PlanError::Version {
            found: 5,
            expected: 4
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
            found: 5,
            expected: 4
        }
    );
    // serde_json writes a NaN as null, which does not read back as a number.
    plan.version = 4;
    op_mut(&mut plan, 0).estimate_us = f64::NAN;
    let err = Plan::from_json(&plan.to_json()).unwrap_err();
    assert!(matches!(err, PlanError::Json(_)), "{err:?}");
}

#[test]
fn plan_error_is_an_error() {
    fn takes(_: &dyn std::error::Error) {}
    takes(&PlanError::NoStreams);
}

/// Deletes op `id` from its stream.
fn delete_op(plan: &mut Plan, id: u32) {
    for s in &mut plan.streams {
        s.ops.retain(|op| op.id != id);
    }
}

/// The ways the issue found plans that loaded and ran to a wrong answer, each
/// now a load error that says what is wrong.
#[test]
fn corruptions_that_ran_to_wrong_answers_are_refused() {
    type Case = (&'static str, fn(&mut Plan), &'static [&'static str]);
    let cases: Vec<Case> = vec![
        (
            "a deleted wait: the experts read what the dispatch writes",
            |p| delete_op(p, 14),
            &[
                "op #12 `dispatch`",
                "writes buffer b10 `recv`",
                "op #15 `expert_up`",
                "reads it",
                "a race",
            ],
        ),
        (
            "a deleted wait: the exchange reads the counts unordered",
            |p| delete_op(p, 4),
            &["op #2 `assign_count`", "op #5 `exchange`", "a race"],
        ),
        (
            "a wait redirected to an earlier event",
            |p| op_mut(p, 14).kind = OpKind::Wait { event: 1 },
            &["buffer b10 `recv`", "a race"],
        ),
        (
            "a launch's output pointed at another buffer",
            |p| {
                if let OpKind::Launch { outputs, .. } = &mut op_mut(p, 17).kind {
                    outputs[0] = 12;
                }
            },
            &[
                "op #17 `unpermute`",
                "binds b12 `y` [64, 64] as `out`",
                "[16, 64] of the whole layer",
            ],
        ),
        (
            "a launch writing the layer's input",
            |p| {
                if let OpKind::Launch { outputs, .. } = &mut op_mut(p, 9).kind {
                    outputs[0] = 0;
                }
            },
            &["op #9 `pack`", "writes buffer b0 `x`, the layer's input"],
        ),
        (
            "a launch's output pointed at a buffer nobody reads again",
            |p| {
                if let OpKind::Launch { outputs, .. } = &mut op_mut(p, 8).kind {
                    outputs[0] = 3;
                }
            },
            &[
                "op #8 `assign_place`",
                "writes buffer b3 `topk_ids`",
                "no op reads it before the pass ends",
            ],
        ),
        (
            "the routing weights swapped for the input",
            |p| {
                if let OpKind::Launch { inputs, .. } = &mut op_mut(p, 17).kind {
                    inputs[2] = 0;
                }
            },
            &[
                "op #17 `unpermute`",
                "binds b0 `x` (bf16)",
                "`weights` is f32",
            ],
        ),
        (
            "a flat all-to-all's scope changed to the inter-node leg",
            |p| {
                if let OpKind::Collective { scope, .. } = &mut op_mut(p, 12).kind {
                    *scope = CollectiveScope::InterNode;
                }
            },
            &[
                "op #12 `dispatch`",
                "runs a hierarchical leg (InterNode)",
                "the plan's dispatch is flat",
            ],
        ),
        (
            "a launch in another phase",
            |p| op_mut(p, 9).phase = Phase::Unpermute,
            &[
                "op #9 `pack`",
                "is in the unpermute phase",
                "a `permute_pack` launch belongs to permute",
            ],
        ),
        (
            "an input swapped for the output",
            |p| {
                if let OpKind::Launch { inputs, .. } = &mut op_mut(p, 9).kind {
                    inputs[0] = 1;
                }
            },
            &[
                "op #9 `pack`",
                "binds b1 `out`",
                "as `x`, expected the layer's input",
            ],
        ),
        (
            "the layer's dtype changed without the buffers",
            |p| p.layer.dtype = DType::F32,
            &["buffers[0]", "`x`, bf16", "f32 [16, 64]"],
        ),
        (
            "a kernel constant changed (dtype of permute_pack)",
            |p| p.kernels[3].constants[0].1 = 0,
            &[
                "op #9 `pack`",
                "k3 `permute_pack`",
                "`dtype` is 0, but the layer gives 1",
            ],
        ),
        (
            "the router's normalisation flipped in the layer only",
            |p| p.layer.router.normalize = false,
            &[
                "k0 `router_fused`",
                "`normalize` is 1, but the layer gives 0",
            ],
        ),
        (
            "the router's scoring flipped in the layer only",
            |p| p.layer.router.scoring = Scoring::Sigmoid,
            &["`scoring` is 0, but the layer gives 1"],
        ),
        (
            "an unknown constant",
            |p| p.kernels[3].constants.push(("zz_extra".into(), 1)),
            &["`zz_extra`", "does not take"],
        ),
        (
            "a GEMM reading a buffer smaller than it needs",
            |p| {
                if let OpKind::Gemm { m, .. } = &mut op_mut(p, 15).kind {
                    *m = 65;
                }
            },
            &["op #15 `expert_up`", "`recv`", "at least m = 65 rows of 64"],
        ),
        (
            "a GEMM whose weights do not match the layer",
            |p| {
                if let OpKind::Gemm { k, .. } = &mut op_mut(p, 16).kind {
                    *k = 64;
                }
            },
            &["op #16 `expert_down`", "k 64", "the layer's are k 32"],
        ),
        (
            "shared experts in the layer without shared ops",
            |p| {
                p.layer.shared = Some(SharedConfig {
                    count: 1,
                    intermediate: 32,
                    ffn: Activation::Swiglu { limit: None },
                    bias: false,
                    sigmoid_gate: false,
                })
            },
            &["0 shared-expert GEMMs", "with shared experts needs 2"],
        ),
        (
            "the overflow flag sharing bytes with a buffer used before the host reads it",
            |p| p.buffers[8].offset = 5120,
            &[
                "buffer b8 `overflow_flag`",
                "buffer b9 `send`",
                "share arena bytes",
            ],
        ),
        (
            "the output sharing bytes with scratch",
            |p| p.buffers[12].offset = 2048,
            &["buffer b1 `out`", "buffer b12 `y`", "share arena bytes"],
        ),
        (
            "an op of a chunk the plan does not have",
            |p| op_mut(p, 12).chunk = Some(3),
            &["op #12 `dispatch`", "chunk 3", "1 chunks"],
        ),
        (
            "absurd counts: a million events",
            |p| p.events = 1_000_000,
            &["1000000 events", "at most 65536"],
        ),
        (
            "an assignment pass that binds the wrong buffer",
            |p| {
                if let OpKind::Launch { inputs, .. } = &mut op_mut(p, 8).kind {
                    inputs[2] = 5;
                }
                p.buffers[5].live.1 = 8;
            },
            &["op #8 `assign_place`", "`assign_meta`", "group's metadata"],
        ),
    ];
    for (what, mutate, parts) in cases {
        let mut plan = valid_plan();
        mutate(&mut plan);
        let text = error(&plan);
        assert!(
            parts.iter().all(|p| text.contains(p)),
            "{what}: {text} lacks one of {parts:?}"
        );
    }
}

/// Huge sizes are refused by checked arithmetic, never a panic.
#[test]
fn sizes_near_the_limits_are_errors() {
    type Case = fn(&mut Plan);
    let cases: Vec<Case> = vec![
        |p| p.layer.hidden = u64::MAX,
        |p| p.layer.hidden = 1_000_000_000_000,
        |p| p.layer.intermediate = u64::MAX,
        |p| p.layer.tokens_per_rank = u64::MAX,
        |p| p.memory.peak_activation_bytes = u64::MAX,
        |p| p.mesh.dp = 1_000_000_000,
        |p| p.buffers[10].shape = vec![u64::MAX / 2, 64],
        |p| {
            p.layer.shared = Some(SharedConfig {
                count: u64::MAX,
                intermediate: u64::MAX,
                ffn: Activation::Relu,
                bias: false,
                sigmoid_gate: false,
            })
        },
    ];
    for (i, mutate) in cases.into_iter().enumerate() {
        let mut plan = valid_plan();
        mutate(&mut plan);
        let result = std::panic::catch_unwind(|| plan.validate());
        assert!(matches!(result, Ok(Err(_))), "case {i}: {result:?}");
    }
}
