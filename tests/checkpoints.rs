//! Checkpoints as each model family writes them (`moec_tests::checkpoint`),
//! loaded by the runtime with no renaming: the loaded weights must equal the
//! canonical per-expert ones they were written from, the layer run on the CPU
//! backend with them must match the independent reference, and every broken
//! checkpoint must be an error that names the tensor.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moec::compile::{compile, Options};
use moec_runtime::cpu::{CpuBackend, CpuOptions};
use moec_runtime::plan::{DType, LayerConfig, Plan};
use moec_runtime::weights::{
    load_checkpoint, random_inputs, Family, LayerWeights, Select, WeightsError,
};
use moec_tests::checkpoint::{self as ck, Entry};
use moec_tests::reference::{self, Tensor};
use safetensors::Dtype;

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("checkpoints")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn plan(source: &str) -> Plan {
    let checked = moec_lang::check_source(source);
    let (program, _) = checked
        .program
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    compile(&program, &Options::default()).unwrap().plan
}

fn source(body: &str) -> String {
    format!(
        "layer t {{\n hidden = 64\n dtype = f32\n tokens_per_rank = 24\n {body}\n}}\n\n\
         mesh {{\n gpus_per_node = 2\n device = H100\n ep = 2\n}}\n"
    )
}

const GPT_OSS: &str = "experts {\n count = 4\n ffn = swiglu\n intermediate = 32\n bias = true\n \
     swiglu_limit = 7.0\n }\n router {\n scoring = softmax\n top_k = 2\n softmax_over = topk\n }\n \
     capacity = dropless";

/// gpt-oss's layer as `moec import` writes it, with the router's logit bias.
const GPT_OSS_BIASED: &str = "experts {\n count = 4\n ffn = swiglu\n intermediate = 32\n \
     bias = true\n swiglu_limit = 7.0\n }\n router {\n scoring = softmax\n top_k = 2\n \
     logit_bias = true\n softmax_over = topk\n }\n capacity = dropless";

const LLAMA4: &str = "experts {\n count = 4\n ffn = swiglu\n intermediate = 16\n }\n \
     shared_experts {\n count = 1\n intermediate = 16\n }\n router {\n scoring = sigmoid\n \
     top_k = 1\n weight_on = input\n }\n capacity = dropless";

const SWITCH: &str = "experts {\n count = 4\n ffn = relu\n intermediate = 16\n }\n router {\n \
     scoring = softmax\n top_k = 1\n }\n capacity {\n factor = 1.25\n drop = position\n }";

const QWEN3: &str = "experts {\n count = 4\n ffn = swiglu\n intermediate = 16\n }\n router {\n \
     scoring = softmax\n top_k = 2\n normalize = true\n }\n capacity = dropless";

/// hidden 64 is overridden to 136 by the caller, so that the fp8 weights of
/// `[8, 136]` and `[136, 8]` span two 128-wide scale blocks.
const DEEPSEEK: &str = "experts {\n count = 8\n ffn = swiglu\n intermediate = 8\n }\n \
     shared_experts {\n count = 1\n intermediate = 8\n }\n router {\n scoring = sigmoid\n \
     top_k = 2\n selection_bias = true\n groups = 2\n groups_kept = 1\n group_score = top2_sum\n \
     normalize = true\n scale = 2.5\n }\n capacity = dropless";

fn load(path: &Path, layer: &LayerConfig, select: Select) -> LayerWeights {
    let (w, _) = load_checkpoint(path, layer, &select).unwrap_or_else(|e| panic!("{e}"));
    w
}

fn load_err(path: &Path, layer: &LayerConfig, select: Select) -> WeightsError {
    match load_checkpoint(path, layer, &select) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

/// Tensor by tensor, so that a failure names the tensor.
fn assert_same(got: &LayerWeights, want: &LayerWeights) {
    let (a, b) = (got.tensors(), want.tensors());
    let names =
        |t: &[(String, Vec<usize>, &[f32])]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.1, y.1, "shape of {}", x.0);
        assert!(x.2 == y.2, "values of {} differ", x.0);
    }
}

/// Runs `plan` on the CPU backend with `loaded` and the reference with the
/// canonical `want`; returns the relative error.
fn against_reference(plan: Plan, loaded: &LayerWeights, want: &LayerWeights) -> f64 {
    let layer = plan.layer.clone();
    let ranks = plan.mesh.world_size() as usize;
    let ep = plan.mesh.ep as usize;
    let inputs = random_inputs(&layer, ranks, layer.tokens_per_rank as usize, 7);
    let backend = CpuBackend::new(plan, loaded, CpuOptions::default()).unwrap();
    let got = backend.forward(&inputs).unwrap();
    let tensors: BTreeMap<String, Tensor> = want
        .tensors()
        .into_iter()
        .map(|(n, shape, data)| (n, Tensor::new(shape, data.to_vec())))
        .collect();
    let reference = reference::forward(&layer, ep, &inputs, &tensors).unwrap();
    assert_eq!(got.stats.routed_per_expert, reference.tokens_per_expert);
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for (g, r) in got
        .outputs
        .iter()
        .flatten()
        .zip(reference.outputs.iter().flatten())
    {
        diff = diff.max(f64::from((g - r).abs()));
        scale = scale.max(f64::from(r.abs()));
    }
    assert!(scale > 1e-3, "the outputs are all (nearly) zero");
    diff / scale
}

#[test]
fn gpt_oss_fused_interleaved_experts_load_as_transformers_writes_them() {
    let dir = tmp("gpt_oss");
    let plan = plan(&source(GPT_OSS_BIASED));
    let want = LayerWeights::random(&plan.layer, 3);
    let path = dir.join("model.safetensors");
    ck::write(&path, &ck::gpt_oss(&want, "model.layers.5."));
    let (got, report) =
        load_checkpoint(&dir, &plan.layer, &Select::Layer(5)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.prefix, "model.layers.5.");
    assert_eq!(report.family, Family::GptOss);
    assert!(report.dequantised.is_empty());
    assert_same(&got, &want);
    let err = against_reference(plan, &got, &want);
    assert!(err < 1e-5, "relative error {err:e}");
}

#[test]
fn gpt_oss_mxfp4_experts_are_dequantised_exactly() {
    let dir = tmp("gpt_oss_mxfp4");
    let plan = plan(&source(GPT_OSS_BIASED));
    let mut want = LayerWeights::random(&plan.layer, 4);
    let entries = ck::gpt_oss_mxfp4(&mut want, "model.layers.0.", 11);
    // Sharded, as the hub ships it.
    ck::write_sharded(&dir, &entries, 3);
    let (got, report) =
        load_checkpoint(&dir, &plan.layer, &Select::Layer(0)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.family, Family::GptOss);
    // One gate-up and one down matrix per expert.
    assert_eq!(report.dequantised.values().sum::<usize>(), 8);
    assert_same(&got, &want);
    let err = against_reference(plan, &got, &want);
    assert!(err < 1e-5, "relative error {err:e}");
}

#[test]
fn mxfp4_rounds_to_the_layer_dtype_after_dequantising() {
    let dir = tmp("gpt_oss_mxfp4_bf16");
    let mut plan = plan(&source(GPT_OSS));
    plan.layer.dtype = DType::Bf16;
    let mut want = LayerWeights::random(&plan.layer, 4);
    let path = dir.join("model.safetensors");
    ck::write(&path, &ck::gpt_oss_mxfp4(&mut want, "", 12));
    let got = load(&path, &plan.layer, Select::Prefix(String::new()));
    // e2m1 times a power of two has at most two significant bits: exact in bf16.
    assert!(got.experts[1].up == want.experts[1].up);
    assert!(got.experts[3].down == want.experts[3].down);
}

#[test]
fn llama4_multimodal_checkpoint_loads_by_layer_number() {
    let dir = tmp("llama4");
    let plan = plan(&source(LLAMA4));
    let want = LayerWeights::random(&plan.layer, 5);
    let other = LayerWeights::random(&plan.layer, 6);
    let mut entries = ck::llama4(&want, "language_model.model.layers.1.");
    entries.extend(ck::llama4(&other, "language_model.model.layers.3."));
    // Layer 0 is dense, as every other Llama-4 Maverick layer is.
    entries.push(ck::f32_entry(
        "language_model.model.layers.0.feed_forward.gate_proj.weight".to_string(),
        vec![2, 64],
        &[0.5; 128],
    ));
    let path = dir.join("model.safetensors");
    ck::write(&path, &entries);
    let (got, report) =
        load_checkpoint(&path, &plan.layer, &Select::Layer(1)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.prefix, "language_model.model.layers.1.");
    assert_eq!(report.family, Family::Llama4);
    assert_same(&got, &want);
    assert_same(&load(&path, &plan.layer, Select::Layer(3)), &other);
    // The embedding API takes a layer number too.
    let weights = moec_runtime::Weights::FileLayer {
        path: path.clone(),
        layer: 3,
    };
    assert!(moec_runtime::Layer::from_plan(plan.clone(), weights, CpuOptions::default()).is_ok());
    let err = against_reference(plan.clone(), &got, &want);
    assert!(err < 1e-5, "relative error {err:e}");

    let msg = load_err(&path, &plan.layer, Select::Layer(0)).to_string();
    assert!(
        msg.contains("no MoE layer 0")
            && msg.contains("feed_forward.router.weight")
            && msg.contains("dense")
            && msg.contains("MoE layers are 1, 3"),
        "{msg}"
    );
    let msg = load_err(&path, &plan.layer, Select::Layer(9)).to_string();
    assert!(
        msg.contains("MoE layers are 1, 3") && !msg.contains("dense"),
        "{msg}"
    );
}

#[test]
fn switch_transformers_names_load_and_an_encoder_decoder_layer_needs_its_prefix() {
    let dir = tmp("switch");
    let plan = plan(&source(SWITCH));
    let want = LayerWeights::random(&plan.layer, 8);
    let decoder = LayerWeights::random(&plan.layer, 9);
    let mut entries = ck::switch(&want, "encoder.block.1.layer.1.");
    entries.extend(ck::switch(&decoder, "decoder.block.1.layer.2."));
    let path = dir.join("model.safetensors");
    ck::write(&path, &entries);
    let (got, report) = load_checkpoint(
        &path,
        &plan.layer,
        &Select::Prefix("encoder.block.1.layer.1.".to_string()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.family, Family::Switch);
    assert_same(&got, &want);
    let err = against_reference(plan.clone(), &got, &want);
    assert!(err < 1e-5, "relative error {err:e}");

    let err = load_err(&path, &plan.layer, Select::Layer(1));
    assert!(
        matches!(err, WeightsError::AmbiguousLayer { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("`decoder.block.1.layer.2.`") && msg.contains("`encoder.block.1.layer.1.`"),
        "{msg}"
    );
}

#[test]
fn transformers5_fused_output_major_experts_load() {
    let dir = tmp("qwen3_fused");
    let plan = plan(&source(QWEN3));
    let want = LayerWeights::random(&plan.layer, 10);
    let path = dir.join("model.safetensors");
    ck::write(&path, &ck::transformers5_fused(&want, "model.layers.2."));
    let (got, report) =
        load_checkpoint(&path, &plan.layer, &Select::Layer(2)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.family, Family::Transformers5Fused);
    assert_same(&got, &want);
}

#[test]
fn per_expert_names_load_by_layer_number_from_a_sharded_checkpoint() {
    let dir = tmp("per_expert");
    let plan = plan(&source(QWEN3));
    let want = LayerWeights::random(&plan.layer, 13);
    let mut entries = ck::per_expert(&want, "model.layers.4.");
    entries.extend(ck::per_expert(
        &LayerWeights::random(&plan.layer, 14),
        "model.layers.5.",
    ));
    ck::write_sharded(&dir, &entries, 2);
    let (got, report) =
        load_checkpoint(&dir, &plan.layer, &Select::Layer(4)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.family, Family::PerExpert);
    assert_same(&got, &want);
}

fn deepseek_plan() -> Plan {
    plan(&source(DEEPSEEK).replace("hidden = 64", "hidden = 136"))
}

#[test]
fn deepseek_fp8_block_scaled_weights_are_dequantised_exactly() {
    let dir = tmp("deepseek_fp8");
    let plan = deepseek_plan();
    let mut want = LayerWeights::random(&plan.layer, 15);
    let entries = ck::deepseek_fp8(&mut want, "model.layers.3.", 16);
    ck::write_sharded(&dir, &entries, 4);
    let (got, report) =
        load_checkpoint(&dir, &plan.layer, &Select::Layer(3)).unwrap_or_else(|e| panic!("{e}"));
    // Three projections for each of the 8 experts and the shared expert.
    assert_eq!(report.dequantised.values().sum::<usize>(), 27);
    assert_same(&got, &want);
    let err = against_reference(plan, &got, &want);
    assert!(err < 1e-5, "relative error {err:e}");
}

#[test]
fn fp8_weights_round_to_a_bf16_layer_once() {
    let dir = tmp("deepseek_fp8_bf16");
    let mut plan = deepseek_plan();
    plan.layer.dtype = DType::Bf16;
    let mut want = LayerWeights::random(&plan.layer, 15);
    let path = dir.join("model.safetensors");
    ck::write(&path, &ck::deepseek_fp8(&mut want, "", 17));
    let got = load(&path, &plan.layer, Select::Prefix(String::new()));
    let expected: Vec<f32> = want.experts[2]
        .down
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    assert!(got.experts[2].down == expected);
}

/// Replaces the entry named `name` (which must exist).
fn replace(entries: &mut [Entry], name: &str, with: Entry) {
    let e = entries
        .iter_mut()
        .find(|e| e.0 == name)
        .unwrap_or_else(|| panic!("no {name}"));
    *e = with;
}

fn remove(entries: &mut Vec<Entry>, name: &str) {
    let before = entries.len();
    entries.retain(|e| e.0 != name);
    assert_eq!(entries.len(), before - 1, "no {name}");
}

/// Writes `entries`, loads layer `prefix`, and returns the error's message.
fn broken(dir: &Path, layer: &LayerConfig, entries: &[Entry]) -> (WeightsError, String) {
    let path = dir.join("model.safetensors");
    ck::write(&path, entries);
    let err = load_err(&path, layer, Select::Prefix(String::new()));
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn broken_fused_and_quantised_checkpoints_name_the_tensor() {
    let dir = tmp("broken");
    let plan = plan(&source(GPT_OSS));
    let layer = &plan.layer;
    let w = LayerWeights::random(layer, 1);
    let good = ck::gpt_oss(&w, "");

    // A layer without `logit_bias` loads a zero router bias, and refuses a
    // nonzero one rather than drop it.
    let path = dir.join("model.safetensors");
    ck::write(&path, &good);
    assert!(load_checkpoint(&path, layer, &Select::Prefix(String::new())).is_ok());
    let mut e = good.clone();
    replace(
        &mut e,
        "mlp.router.bias",
        ck::f32_entry("mlp.router.bias".into(), vec![4], &[0.0, 0.25, 0.0, 0.0]),
    );
    let (err, msg) = broken(&dir, layer, &e);
    assert!(matches!(err, WeightsError::Unsupported { .. }), "{err:?}");
    assert!(
        msg.contains("`mlp.router.bias`") && msg.contains("the layer has no `logit_bias = true`"),
        "{msg}"
    );

    // A fused tensor with an expert too few.
    let mut e = good.clone();
    let ((_, gu), _) = ck::fused_experts(&w, ck::Pairing::Interleaved, true);
    replace(
        &mut e,
        "mlp.experts.gate_up_proj",
        ck::f32_entry(
            "mlp.experts.gate_up_proj".into(),
            vec![3, 64, 64],
            &gu[..3 * 64 * 64],
        ),
    );
    let (err, msg) = broken(&dir, layer, &e);
    assert!(matches!(err, WeightsError::Shape { .. }), "{err:?}");
    assert!(
        msg.contains("`mlp.experts.gate_up_proj` has shape [3, 64, 64], expected [4, 64, 64]"),
        "{msg}"
    );

    // Missing fused tensor: names it and its MXFP4 form.
    let mut e = good.clone();
    remove(&mut e, "mlp.experts.down_proj");
    let (_, msg) = broken(&dir, layer, &e);
    assert!(
        msg.contains("`mlp.experts.down_proj` not found") && msg.contains("down_proj_blocks"),
        "{msg}"
    );

    // MXFP4: a scale of the wrong shape, a NaN scale, blocks of another dtype.
    let mut w4 = w.clone();
    let mx = ck::gpt_oss_mxfp4(&mut w4, "", 2);
    let mut e = mx.clone();
    replace(
        &mut e,
        "mlp.experts.down_proj_scales",
        (
            "mlp.experts.down_proj_scales".into(),
            Dtype::U8,
            vec![4, 64, 2],
            vec![127; 512],
        ),
    );
    let (err, msg) = broken(&dir, layer, &e);
    assert!(matches!(err, WeightsError::Shape { .. }), "{err:?}");
    assert!(msg.contains("`mlp.experts.down_proj_scales`"), "{msg}");
    let mut e = mx.clone();
    let scales = e
        .iter_mut()
        .find(|x| x.0 == "mlp.experts.gate_up_proj_scales")
        .unwrap();
    scales.3[5] = 0xff;
    let (err, msg) = broken(&dir, layer, &e);
    assert!(matches!(err, WeightsError::NotFinite { .. }), "{err:?}");
    assert!(msg.contains("gate_up_proj_scales"), "{msg}");
    let mut e = mx.clone();
    remove(&mut e, "mlp.experts.gate_up_proj_scales");
    let (_, msg) = broken(&dir, layer, &e);
    assert!(
        msg.contains("`mlp.experts.gate_up_proj_scales` not found"),
        "{msg}"
    );

    // fp8: a missing or misshapen weight_scale_inv.
    let ds = deepseek_plan();
    let mut wd = LayerWeights::random(&ds.layer, 1);
    let fp8 = ck::deepseek_fp8(&mut wd, "", 3);
    let mut e = fp8.clone();
    remove(&mut e, "mlp.experts.1.up_proj.weight_scale_inv");
    let (_, msg) = broken(&dir, &ds.layer, &e);
    assert!(
        msg.contains("`mlp.experts.1.up_proj.weight_scale_inv` not found") && msg.contains("fp8"),
        "{msg}"
    );
    let mut e = fp8.clone();
    replace(
        &mut e,
        "mlp.experts.1.up_proj.weight_scale_inv",
        ck::f32_entry(
            "mlp.experts.1.up_proj.weight_scale_inv".into(),
            vec![1, 1],
            &[1.0],
        ),
    );
    let (err, msg) = broken(&dir, &ds.layer, &e);
    assert!(matches!(err, WeightsError::Shape { .. }), "{err:?}");
    assert!(msg.contains("expected [1, 2]"), "{msg}");
    let mut e = fp8;
    let codes = e
        .iter_mut()
        .find(|x| x.0 == "mlp.experts.0.gate_proj.weight")
        .unwrap();
    codes.3[9] = 0x7f;
    let (err, msg) = broken(&dir, &ds.layer, &e);
    assert!(
        matches!(err, WeightsError::NotFinite { index: 9, .. }),
        "{err:?}"
    );
    assert!(msg.contains("`mlp.experts.0.gate_proj.weight`"), "{msg}");
}

#[test]
fn a_prefix_without_a_router_lists_the_names_looked_for() {
    let dir = tmp("no_router");
    let plan = plan(&source(QWEN3));
    let w = LayerWeights::random(&plan.layer, 1);
    let path = dir.join("model.safetensors");
    ck::write(&path, &ck::per_expert(&w, "model.layers.7."));
    let err = load_err(&path, &plan.layer, Select::Prefix("model.layers.6.".into()));
    assert!(matches!(err, WeightsError::NoMoeBlock { .. }), "{err:?}");
    let msg = err.to_string();
    for name in [
        "`model.layers.6.mlp.gate.weight`",
        "`model.layers.6.block_sparse_moe.gate.weight`",
        "`model.layers.6.mlp.router.weight`",
        "`model.layers.6.feed_forward.router.weight`",
        "`model.layers.6.mlp.router.classifier.weight`",
        "prefix `model.layers.7.`",
    ] {
        assert!(msg.contains(name), "{name} in {msg}");
    }

    // A fused layout with experts that are not gated is refused.
    let relu = self::plan(&source(SWITCH));
    ck::write(
        &path,
        &ck::gpt_oss(
            &LayerWeights::random(&self::plan(&source(GPT_OSS)).layer, 1),
            "",
        ),
    );
    let msg = load_err(&path, &relu.layer, Select::Prefix(String::new())).to_string();
    assert!(msg.contains("gated") && msg.contains("relu"), "{msg}");
}

/// Runs the CLI in-process: (exit code, stdout, stderr).
fn moec(args: &[&str]) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let argv: Vec<&str> = std::iter::once("moec")
        .chain(args.iter().copied())
        .collect();
    let code = moec::cli::run(argv, &mut out, &mut err, false);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn moec_run_finds_the_layer_and_says_what_it_dequantised() {
    let dir = tmp("cli");
    let file = dir.join("gpt_oss.moe");
    std::fs::write(&file, source(GPT_OSS)).unwrap();
    let plan = plan(&source(GPT_OSS));
    let mut w = LayerWeights::random(&plan.layer, 1);
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    ck::write_sharded(&ckpt, &ck::gpt_oss_mxfp4(&mut w, "model.layers.2.", 5), 2);
    let (file, ckpt) = (file.display().to_string(), ckpt.display().to_string());

    let (code, out, err) = moec(&["run", &file, "--weights", &ckpt, "--layer", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "weights: {ckpt}, prefix `model.layers.2.`, gpt-oss fused experts (gate/up interleaved, input-major); \
             dequantised on the CPU: 8 MXFP4 expert matrices (an e8m0 scale per 32 values)"
        )),
        "{out}"
    );

    let (code, _, err) = moec(&["run", &file, "--weights", &ckpt, "--layer", "1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "no MoE layer 1: looked for `layers.1.`, `blocks.1.`, `block.1.` or `h.1.` followed \
             by a router's name (`mlp.gate.weight`, `block_sparse_moe.gate.weight`, "
        ) && err.contains("the MoE layers are 2"),
        "{err}"
    );
    let (code, _, err) = moec(&[
        "run",
        &file,
        "--weights",
        &ckpt,
        "--layer",
        "2",
        "--prefix",
        "x.",
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = moec(&["run", &file, "--layer", "2"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn jamba_granite_dbrx_and_ernie_checkpoints_load_as_their_families_write_them() {
    let dir = tmp("more_families");
    let qwen = plan(&source(QWEN3));
    let w = LayerWeights::random(&qwen.layer, 21);
    let path = dir.join("model.safetensors");
    for (entries, prefix, family) in [
        (
            ck::jamba(&w, "model.layers.1."),
            "model.layers.1.",
            Family::Jamba,
        ),
        (
            ck::granite(&w, "model.layers.0."),
            "model.layers.0.",
            Family::Granite,
        ),
        (
            ck::dbrx(&w, "transformer.blocks.2."),
            "transformer.blocks.2.",
            Family::Dbrx,
        ),
    ] {
        ck::write(&path, &entries);
        let n: u64 = prefix
            .trim_end_matches('.')
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let (got, report) = load_checkpoint(&path, &qwen.layer, &Select::Layer(n))
            .unwrap_or_else(|e| panic!("{family:?}: {e}"));
        assert_eq!(report.family, family);
        assert_eq!(report.prefix, prefix);
        assert_same(&got, &w);
    }
    // DBRX's stacked tensors are checked against E * F rows.
    let mut e = ck::dbrx(&w, "");
    e[3] = ck::f32_entry(
        "ffn.experts.mlp.w2".into(),
        vec![60, 64],
        &vec![0.0; 60 * 64],
    );
    ck::write(&path, &e);
    let msg = load_err(&path, &qwen.layer, Select::Prefix(String::new())).to_string();
    assert!(
        msg.contains("`ffn.experts.mlp.w2` has shape [60, 64], expected [64, 64]"),
        "{msg}"
    );

    // ERNIE-4.5: DeepSeek-style names with its own selection bias.
    let ds = deepseek_plan();
    let w = LayerWeights::random(&ds.layer, 22);
    ck::write(&path, &ck::ernie(&w, "model.layers.1."));
    let got = load(&path, &ds.layer, Select::Layer(1));
    assert_same(&got, &w);
    ck::write(
        &path,
        &ck::ernie(&w, "")
            .into_iter()
            .filter(|e| !e.0.contains("moe_statics"))
            .collect::<Vec<_>>(),
    );
    let msg = load_err(&path, &ds.layer, Select::Prefix(String::new())).to_string();
    assert!(
        msg.contains("`mlp.gate.e_score_correction_bias` not found")
            && msg.contains("`mlp.moe_statics.e_score_correction_bias`"),
        "{msg}"
    );
}

#[test]
fn transformers5_fused_fp8_experts_are_dequantised_per_expert() {
    let dir = tmp("fused_fp8");
    // hidden 136: the [2F, 136] and [136, F] experts span two scale blocks.
    let plan = plan(&source(QWEN3).replace("hidden = 64", "hidden = 136"));
    let mut want = LayerWeights::random(&plan.layer, 30);
    let path = dir.join("model.safetensors");
    ck::write(
        &path,
        &ck::transformers5_fused_fp8(&mut want, "model.layers.0.", 31),
    );
    let (got, report) =
        load_checkpoint(&path, &plan.layer, &Select::Layer(0)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.family, Family::Transformers5Fused);
    assert_eq!(report.dequantised.values().sum::<usize>(), 8);
    assert_same(&got, &want);
    let err = against_reference(plan, &got, &want);
    assert!(err < 1e-5, "relative error {err:e}");
}
