//! Small checkpoints in each model family's real layout, written from a
//! layer's weights in moec's canonical form (`LayerWeights`, PyTorch
//! `Linear` layout `[out, in]`), independently of the loader.
//!
//! Each writer follows the layout as `../shared/MODELS.md` and the models'
//! code give it: gpt-oss's fused, input-major, interleaved `gate_up_proj`,
//! Llama-4's fused, input-major, concatenated one, transformers 5's fused
//! output-major tensors, Switch Transformers' `expert_{e}.wi/wo`, Mixtral's
//! `w1/w3/w2`. The quantised writers draw random codes (fp8 e4m3 with
//! 128 x 128 block scales; MXFP4 blocks with e8m0 scales), decode them here
//! with their own bit-level decoders, and put the decoded values into the
//! weights, so the loader's dequantisation is held against an independent
//! one.

use std::path::Path;

use moec_runtime::weights::{Ffn, LayerWeights};
use safetensors::Dtype;

/// One tensor of a checkpoint: name, dtype, shape, little-endian bytes.
pub type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

/// A small deterministic generator (xorshift64*), so tests need no crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect()
}

pub fn f32_entry(name: String, shape: Vec<usize>, values: &[f32]) -> Entry {
    assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
    (name, Dtype::F32, shape, f32_bytes(values))
}

/// Writes one `.safetensors` file.
pub fn write(path: &Path, entries: &[Entry]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(n, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .unwrap_or_else(|e| panic!("{n}: {e}"));
            (n.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Writes `entries` round-robin into `shards` files of directory `dir` with
/// a `model.safetensors.index.json`, as sharded hub checkpoints are.
pub fn write_sharded(dir: &Path, entries: &[Entry], shards: usize) {
    let mut files: Vec<Vec<Entry>> = vec![Vec::new(); shards];
    let mut map = serde_json::Map::new();
    for (i, e) in entries.iter().enumerate() {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", i % shards + 1);
        map.insert(e.0.clone(), serde_json::Value::String(name));
        files[i % shards].push(e.clone());
    }
    for (i, f) in files.iter().enumerate() {
        write(
            &dir.join(format!("model-{:05}-of-{shards:05}.safetensors", i + 1)),
            f,
        );
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())
        .unwrap_or_else(|e| panic!("{e}"));
}

fn gate(f: &Ffn) -> &[f32] {
    f.gate
        .as_deref()
        .unwrap_or_else(|| panic!("a gated expert"))
}

/// `[rows, cols]` to `[cols, rows]`.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// How a fused `gate_up` orders its `2F` outputs.
#[derive(Clone, Copy)]
pub enum Pairing {
    /// gate = `0::2`, up = `1::2` (gpt-oss).
    Interleaved,
    /// gate = `0..F`, up = `F..2F` (Llama-4, transformers 5).
    Concatenated,
}

/// Expert `f`'s `[2F, H]` gate-up matrix (output-major) in `pairing` order.
fn gate_up_rows(e: &Ffn, hidden: usize, pairing: Pairing) -> Vec<f32> {
    let f = e.width;
    let (g, u) = (gate(e), &e.up);
    let mut out = Vec::with_capacity(2 * f * hidden);
    for o in 0..2 * f {
        let (src, row) = match pairing {
            Pairing::Interleaved => (if o % 2 == 0 { g } else { &u[..] }, o / 2),
            Pairing::Concatenated => (if o < f { g } else { &u[..] }, o % f),
        };
        out.extend_from_slice(&src[row * hidden..(row + 1) * hidden]);
    }
    out
}

/// A tensor's shape and values.
pub type Shaped = (Vec<usize>, Vec<f32>);

/// The fused `[E, 2F, H]` (or input-major `[E, H, 2F]`) gate-up tensor and
/// the `[E, H, F]` (or `[E, F, H]`) down tensor of `w`.
pub fn fused_experts(w: &LayerWeights, pairing: Pairing, input_major: bool) -> (Shaped, Shaped) {
    let (e, h) = (w.experts.len(), w.hidden);
    let f = w.experts[0].width;
    let mut gate_up = Vec::new();
    let mut down = Vec::new();
    for x in &w.experts {
        let m = gate_up_rows(x, h, pairing);
        if input_major {
            gate_up.extend(transpose(&m, 2 * f, h));
            down.extend(transpose(&x.down, h, f));
        } else {
            gate_up.extend(m);
            down.extend_from_slice(&x.down);
        }
    }
    if input_major {
        ((vec![e, h, 2 * f], gate_up), (vec![e, f, h], down))
    } else {
        ((vec![e, 2 * f, h], gate_up), (vec![e, h, f], down))
    }
}

/// The `[E, 2F]` gate-up bias in `pairing` order and the `[E, H]` down bias.
fn fused_biases(w: &LayerWeights, pairing: Pairing) -> (Vec<f32>, Vec<f32>) {
    let mut gate_up = Vec::new();
    let mut down = Vec::new();
    for x in &w.experts {
        let f = x.width;
        let (g, u) = (
            x.gate_bias.as_deref().unwrap_or_else(|| panic!("biases")),
            x.up_bias.as_deref().unwrap_or_else(|| panic!("biases")),
        );
        for o in 0..2 * f {
            gate_up.push(match pairing {
                Pairing::Interleaved if o % 2 == 0 => g[o / 2],
                Pairing::Interleaved => u[o / 2],
                Pairing::Concatenated if o < f => g[o],
                Pairing::Concatenated => u[o - f],
            });
        }
        down.extend_from_slice(x.down_bias.as_deref().unwrap_or_else(|| panic!("biases")));
    }
    (gate_up, down)
}

/// A shared expert's tensors under `{prefix}{module}.`, per-expert style.
fn shared_entries(w: &LayerWeights, prefix: &str, module: &str) -> Vec<Entry> {
    let h = w.hidden;
    let Some(s) = &w.shared else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(g) = &s.gate {
        out.push(f32_entry(
            format!("{prefix}{module}.gate_proj.weight"),
            vec![s.width, h],
            g,
        ));
    }
    out.push(f32_entry(
        format!("{prefix}{module}.up_proj.weight"),
        vec![s.width, h],
        &s.up,
    ));
    out.push(f32_entry(
        format!("{prefix}{module}.down_proj.weight"),
        vec![h, s.width],
        &s.down,
    ));
    out
}

/// The router bias of `w` (its logit bias), or zeros when it has none (a
/// gpt-oss checkpoint always has one).
fn router_bias(w: &LayerWeights) -> Vec<f32> {
    w.router_logit_bias
        .clone()
        .unwrap_or_else(|| vec![0.0; w.experts.len()])
}

/// gpt-oss as transformers writes it: `mlp.router.weight` and
/// `mlp.router.bias` (the logit bias of `w`, or zeros), fused input-major
/// interleaved experts with biases.
pub fn gpt_oss(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    let (e, h) = (w.experts.len(), w.hidden);
    let f = w.experts[0].width;
    let ((gu_shape, gu), (down_shape, down)) = fused_experts(w, Pairing::Interleaved, true);
    let (gu_bias, down_bias) = fused_biases(w, Pairing::Interleaved);
    vec![
        f32_entry(format!("{prefix}mlp.router.weight"), vec![e, h], &w.router),
        f32_entry(format!("{prefix}mlp.router.bias"), vec![e], &router_bias(w)),
        f32_entry(format!("{prefix}mlp.experts.gate_up_proj"), gu_shape, &gu),
        f32_entry(
            format!("{prefix}mlp.experts.gate_up_proj_bias"),
            vec![e, 2 * f],
            &gu_bias,
        ),
        f32_entry(format!("{prefix}mlp.experts.down_proj"), down_shape, &down),
        f32_entry(
            format!("{prefix}mlp.experts.down_proj_bias"),
            vec![e, h],
            &down_bias,
        ),
    ]
}

/// Llama-4: `feed_forward.router.weight`, fused input-major experts (gate
/// then up), `feed_forward.shared_expert.*`.
pub fn llama4(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    let (e, h) = (w.experts.len(), w.hidden);
    let ((gu_shape, gu), (down_shape, down)) = fused_experts(w, Pairing::Concatenated, true);
    let mut out = vec![
        f32_entry(
            format!("{prefix}feed_forward.router.weight"),
            vec![e, h],
            &w.router,
        ),
        f32_entry(
            format!("{prefix}feed_forward.experts.gate_up_proj"),
            gu_shape,
            &gu,
        ),
        f32_entry(
            format!("{prefix}feed_forward.experts.down_proj"),
            down_shape,
            &down,
        ),
    ];
    out.extend(shared_entries(w, prefix, "feed_forward.shared_expert"));
    out
}

/// transformers 5's own fused layout (`save_original_format=False`):
/// `mlp.gate.weight`, `mlp.experts.gate_up_proj [E, 2F, H]`,
/// `mlp.experts.down_proj [E, H, F]`.
pub fn transformers5_fused(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    let (e, h) = (w.experts.len(), w.hidden);
    let ((gu_shape, gu), (down_shape, down)) = fused_experts(w, Pairing::Concatenated, false);
    let mut out = vec![
        f32_entry(format!("{prefix}mlp.gate.weight"), vec![e, h], &w.router),
        f32_entry(format!("{prefix}mlp.experts.gate_up_proj"), gu_shape, &gu),
        f32_entry(format!("{prefix}mlp.experts.down_proj"), down_shape, &down),
    ];
    out.extend(shared_entries(w, prefix, "mlp.shared_experts"));
    out
}

/// Switch Transformers: `mlp.router.classifier.weight`,
/// `mlp.experts.expert_{e}.wi.weight` and `.wo.weight` (ReLU experts).
pub fn switch(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    let (e, h) = (w.experts.len(), w.hidden);
    let mut out = vec![f32_entry(
        format!("{prefix}mlp.router.classifier.weight"),
        vec![e, h],
        &w.router,
    )];
    for (i, x) in w.experts.iter().enumerate() {
        out.push(f32_entry(
            format!("{prefix}mlp.experts.expert_{i}.wi.weight"),
            vec![x.width, h],
            &x.up,
        ));
        out.push(f32_entry(
            format!("{prefix}mlp.experts.expert_{i}.wo.weight"),
            vec![h, x.width],
            &x.down,
        ));
    }
    out
}

/// Every tensor of `w` under its canonical (DeepSeek/Qwen) name, in F32.
pub fn per_expert(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    w.tensors()
        .into_iter()
        .map(|(name, shape, values)| f32_entry(format!("{prefix}{name}"), shape, values))
        .collect()
}

/// The e2m1 value of a 4-bit code: sign, two exponent bits (bias 1), one
/// mantissa bit; exponent 0 is subnormal (`m * 0.5`).
pub fn e2m1(code: u8) -> f32 {
    let sign = if code & 0x8 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((code >> 1) & 0x3);
    let man = f32::from(code & 0x1);
    let magnitude = if exp == 0 {
        man * 0.5
    } else {
        (1.0 + man * 0.5) * 2f32.powi(exp - 1)
    };
    sign * magnitude
}

/// The fp8 e4m3 (FN) value of a byte: sign, four exponent bits (bias 7),
/// three mantissa bits; exponent 0 is subnormal (`m/8 * 2^-6`).
pub fn e4m3(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((code >> 3) & 0xf);
    let man = f32::from(code & 0x7);
    let magnitude = if exp == 0 {
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    sign * magnitude
}

/// Random MXFP4 `[rows, cols]` (cols a multiple of 32): the blocks
/// `[rows, cols/32, 16]`, the scales `[rows, cols/32]` (e8m0 in
/// `scale_lo..=scale_hi`) and the decoded `[rows, cols]` values.
pub fn random_mxfp4(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    scale_lo: u8,
    scale_hi: u8,
) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    assert_eq!(cols % 32, 0);
    let groups = cols / 32;
    let mut blocks = Vec::with_capacity(rows * groups * 16);
    let mut scales = Vec::with_capacity(rows * groups);
    let mut values = Vec::with_capacity(rows * cols);
    for _ in 0..rows * groups {
        let s = scale_lo + rng.byte() % (scale_hi - scale_lo + 1);
        scales.push(s);
        let factor = 2f32.powi(i32::from(s) - 127);
        for _ in 0..16 {
            let b = rng.byte();
            blocks.push(b);
            // The low nibble is the earlier value.
            values.push(e2m1(b & 0xf) * factor);
            values.push(e2m1(b >> 4) * factor);
        }
    }
    (blocks, scales, values)
}

/// gpt-oss as shipped: the experts in MXFP4. Draws random codes, sets the
/// experts of `w` to their decoded values (gate = even rows of the `[2F, H]`
/// gate-up matrix, up = odd rows) and returns the checkpoint's entries: the
/// router and its bias, `gate_up_proj_blocks`/`_scales`,
/// `down_proj_blocks`/`_scales`, and the biases in f32.
pub fn gpt_oss_mxfp4(w: &mut LayerWeights, prefix: &str, seed: u64) -> Vec<Entry> {
    let (e, h) = (w.experts.len(), w.hidden);
    let f = w.experts[0].width;
    let mut rng = Rng::new(seed);
    let (mut gu_blocks, mut gu_scales, mut down_blocks, mut down_scales) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for x in &mut w.experts {
        let (b, s, m) = random_mxfp4(&mut rng, 2 * f, h, 122, 126);
        gu_blocks.extend(b);
        gu_scales.extend(s);
        let rows = |parity: usize| -> Vec<f32> {
            (0..f)
                .flat_map(|i| m[(2 * i + parity) * h..(2 * i + parity + 1) * h].to_vec())
                .collect()
        };
        x.gate = Some(rows(0));
        x.up = rows(1);
        let (b, s, m) = random_mxfp4(&mut rng, h, f, 122, 126);
        down_blocks.extend(b);
        down_scales.extend(s);
        x.down = m;
    }
    let (gu_bias, down_bias) = fused_biases(w, Pairing::Interleaved);
    let p = |n: &str| format!("{prefix}mlp.experts.{n}");
    vec![
        f32_entry(format!("{prefix}mlp.router.weight"), vec![e, h], &w.router),
        f32_entry(format!("{prefix}mlp.router.bias"), vec![e], &router_bias(w)),
        (
            p("gate_up_proj_blocks"),
            Dtype::U8,
            vec![e, 2 * f, h / 32, 16],
            gu_blocks,
        ),
        (
            p("gate_up_proj_scales"),
            Dtype::U8,
            vec![e, 2 * f, h / 32],
            gu_scales,
        ),
        f32_entry(p("gate_up_proj_bias"), vec![e, 2 * f], &gu_bias),
        (
            p("down_proj_blocks"),
            Dtype::U8,
            vec![e, h, f / 32, 16],
            down_blocks,
        ),
        (
            p("down_proj_scales"),
            Dtype::U8,
            vec![e, h, f / 32],
            down_scales,
        ),
        f32_entry(p("down_proj_bias"), vec![e, h], &down_bias),
    ]
}

/// A random fp8 e4m3 `[rows, cols]` weight with F32 block scales
/// `[ceil(rows/128), ceil(cols/128)]`: the codes (never the NaN codes), the
/// scales, and the decoded values `e4m3(code) * scale` in f32.
pub fn random_fp8(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
    let scales: Vec<f32> = (0..sr * sc).map(|_| rng.uniform(0.001, 0.01)).collect();
    let mut codes = Vec::with_capacity(rows * cols);
    let mut values = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            let mut c = rng.byte();
            if c & 0x7f == 0x7f {
                c ^= 0x01;
            }
            codes.push(c);
            values.push(e4m3(c) * scales[(i / 128) * sc + j / 128]);
        }
    }
    (codes, scales, values)
}

/// DeepSeek-V3 as shipped: every expert and shared-expert projection in fp8
/// e4m3 with `weight_scale_inv`, the router in F32, the selection bias in
/// F32. Sets those projections of `w` to the decoded values (not rounded:
/// the loader rounds them to the layer's dtype).
pub fn deepseek_fp8(w: &mut LayerWeights, prefix: &str, seed: u64) -> Vec<Entry> {
    let mut rng = Rng::new(seed);
    let h = w.hidden;
    let mut out = vec![f32_entry(
        format!("{prefix}mlp.gate.weight"),
        vec![w.experts.len(), h],
        &w.router,
    )];
    if let Some(b) = &w.router_bias {
        out.push(f32_entry(
            format!("{prefix}mlp.gate.e_score_correction_bias"),
            vec![b.len()],
            b,
        ));
    }
    let mut fp8 = |name: String, rows: usize, cols: usize, target: &mut Vec<f32>| {
        let (codes, scales, values) = random_fp8(&mut rng, rows, cols);
        *target = values;
        out.push((
            format!("{name}.weight"),
            Dtype::F8_E4M3,
            vec![rows, cols],
            codes,
        ));
        out.push(f32_entry(
            format!("{name}.weight_scale_inv"),
            vec![rows.div_ceil(128), cols.div_ceil(128)],
            &scales,
        ));
    };
    let mut ffn = |base: String, x: &mut Ffn| {
        let width = x.width;
        if let Some(g) = x.gate.as_mut() {
            fp8(format!("{base}.gate_proj"), width, h, g);
        }
        fp8(format!("{base}.up_proj"), width, h, &mut x.up);
        fp8(format!("{base}.down_proj"), h, width, &mut x.down);
    };
    for (i, x) in w.experts.iter_mut().enumerate() {
        ffn(format!("{prefix}mlp.experts.{i}"), x);
    }
    if let Some(s) = w.shared.as_mut() {
        ffn(format!("{prefix}mlp.shared_experts"), s);
    }
    out
}

/// Jamba: `feed_forward.router.weight` and per-expert
/// `feed_forward.experts.{e}.{gate,up,down}_proj.weight`.
pub fn jamba(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    per_expert(w, prefix)
        .into_iter()
        .map(|(name, dtype, shape, bytes)| {
            let name = name
                .replace("mlp.gate.weight", "feed_forward.router.weight")
                .replace("mlp.experts.", "feed_forward.experts.");
            (name, dtype, shape, bytes)
        })
        .collect()
}

/// Granite MoE: `block_sparse_moe.router.layer.weight`,
/// `block_sparse_moe.input_linear.weight` `[E, 2F, H]` (gate rows first) and
/// `output_linear.weight` `[E, H, F]`.
pub fn granite(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    let (e, h) = (w.experts.len(), w.hidden);
    let ((gu_shape, gu), (down_shape, down)) = fused_experts(w, Pairing::Concatenated, false);
    vec![
        f32_entry(
            format!("{prefix}block_sparse_moe.router.layer.weight"),
            vec![e, h],
            &w.router,
        ),
        f32_entry(
            format!("{prefix}block_sparse_moe.input_linear.weight"),
            gu_shape,
            &gu,
        ),
        f32_entry(
            format!("{prefix}block_sparse_moe.output_linear.weight"),
            down_shape,
            &down,
        ),
    ]
}

/// DBRX: `ffn.router.layer.weight`, `ffn.experts.mlp.w1` and `v1` (every
/// expert's gate and up `[F, H]` stacked to `[E*F, H]`) and `w2` (every
/// expert's down projection transposed to `[F, H]`, stacked).
pub fn dbrx(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    let (e, h) = (w.experts.len(), w.hidden);
    let f = w.experts[0].width;
    let (mut w1, mut v1, mut w2) = (Vec::new(), Vec::new(), Vec::new());
    for x in &w.experts {
        w1.extend_from_slice(gate(x));
        v1.extend_from_slice(&x.up);
        w2.extend(transpose(&x.down, h, f));
    }
    vec![
        f32_entry(
            format!("{prefix}ffn.router.layer.weight"),
            vec![e, h],
            &w.router,
        ),
        f32_entry(format!("{prefix}ffn.experts.mlp.w1"), vec![e * f, h], &w1),
        f32_entry(format!("{prefix}ffn.experts.mlp.v1"), vec![e * f, h], &v1),
        f32_entry(format!("{prefix}ffn.experts.mlp.w2"), vec![e * f, h], &w2),
    ]
}

/// ERNIE-4.5: per-expert names, with the selection bias as
/// `mlp.moe_statics.e_score_correction_bias` `[1, E]`.
pub fn ernie(w: &LayerWeights, prefix: &str) -> Vec<Entry> {
    per_expert(w, prefix)
        .into_iter()
        .map(|(name, dtype, shape, bytes)| {
            if name.ends_with("mlp.gate.e_score_correction_bias") {
                let e = shape[0];
                (
                    format!("{prefix}mlp.moe_statics.e_score_correction_bias"),
                    dtype,
                    vec![1, e],
                    bytes,
                )
            } else {
                (name, dtype, shape, bytes)
            }
        })
        .collect()
}

/// transformers 5's fused layout in fp8 (`FP8Experts`): `gate_up_proj` and
/// `down_proj` F8_E4M3 `[E, 2F, H]` and `[E, H, F]` with `*_scale_inv`
/// `[E, ⌈out/128⌉, ⌈in/128⌉]`. Sets the experts of `w` to the decoded values.
pub fn transformers5_fused_fp8(w: &mut LayerWeights, prefix: &str, seed: u64) -> Vec<Entry> {
    let mut rng = Rng::new(seed);
    let (e, h) = (w.experts.len(), w.hidden);
    let f = w.experts[0].width;
    let (mut gu_codes, mut gu_scales, mut d_codes, mut d_scales) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for x in &mut w.experts {
        let (codes, scales, m) = random_fp8(&mut rng, 2 * f, h);
        gu_codes.extend(codes);
        gu_scales.extend(scales);
        x.gate = Some(m[..f * h].to_vec());
        x.up = m[f * h..].to_vec();
        let (codes, scales, m) = random_fp8(&mut rng, h, f);
        d_codes.extend(codes);
        d_scales.extend(scales);
        x.down = m;
    }
    let p = |n: &str| format!("{prefix}mlp.experts.{n}");
    vec![
        f32_entry(format!("{prefix}mlp.gate.weight"), vec![e, h], &w.router),
        (
            p("gate_up_proj"),
            Dtype::F8_E4M3,
            vec![e, 2 * f, h],
            gu_codes,
        ),
        f32_entry(
            p("gate_up_proj_scale_inv"),
            vec![e, (2 * f).div_ceil(128), h.div_ceil(128)],
            &gu_scales,
        ),
        (p("down_proj"), Dtype::F8_E4M3, vec![e, h, f], d_codes),
        f32_entry(
            p("down_proj_scale_inv"),
            vec![e, h.div_ceil(128), f.div_ceil(128)],
            &d_scales,
        ),
    ]
}
