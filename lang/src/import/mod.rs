//! Import of Hugging Face `config.json` files: `moec import CONFIG.json`.
//!
//! The importer reads a model's configuration, recognises the model by its
//! `model_type` (or, failing that, its first `architectures` entry), and
//! writes one MoE layer of that model as a `.moe` file on the mesh the options
//! describe. The routing semantics of each supported model follow the model's
//! reference code (see `MODELS.md`): which scoring function, whether the top-k
//! weights are renormalised, group-limited selection, shared experts and so on.
//!
//! Every value comes from the JSON through checked conversions, so no input
//! can make the importer panic: a missing or wrongly typed field is an error
//! that names the field. The generated text is run through the checker before
//! it is returned, so what `import_config` returns always checks clean.

mod json;
mod mesh;
mod model;
mod models;
mod render;
#[cfg(test)]
mod tests;

use json::{parse_json, MAX_INT};
use mesh::mesh_plan;
use models::read_model;
use render::{clean_comment, render};

/// Options for the mesh of an imported layer.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Nodes in the mesh.
    pub nodes: u64,
    /// GPUs per node.
    pub gpus_per_node: u64,
    /// A device preset: H100, H200, H800, A100 or B200.
    pub device: String,
    /// Expert-parallel degree; by default the largest that divides both the
    /// GPUs of the mesh and the experts.
    pub ep: Option<u64>,
    /// Tokens per rank.
    pub tokens_per_rank: u64,
    /// Compute dtype: f32, bf16 or f16.
    pub dtype: String,
    /// How to name the config file in the generated comments.
    pub source_name: String,
    /// Import a model the importer does not know even when its config has
    /// fields that may change the layer's meaning (`--generic`); a generic
    /// import always comes with a warning.
    pub generic: bool,
}

/// An imported layer: the `.moe` text, and warnings for the user (a generic
/// import says what it assumed and ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Turns the text of a Hugging Face `config.json` into a `.moe` file.
///
/// Returns the text of the file, which passes [`crate::check_source`] without
/// diagnostics, or a sentence saying why the config cannot be imported. The
/// warnings of [`import`] are dropped: tools should call that instead.
pub fn import_config(json: &str, options: &ImportOptions) -> Result<String, String> {
    import(json, options).map(|i| i.text)
}

/// [`import_config`] with the warnings a user must see.
pub fn import(json: &str, options: &ImportOptions) -> Result<Imported, String> {
    let root = parse_json(json)?;
    let mesh = mesh_plan(options)?;
    let (model, warnings) = read_model(&root, options.generic)?;
    let text = render(&model, &mesh, options)?;
    let checked = crate::check_source(&text);
    if checked.has_errors() {
        let shown = format!("{} (imported)", clean_comment(&options.source_name));
        return Err(format!(
            "the imported layer does not pass moec's checks:\n{}",
            crate::render(&shown, &text, &checked.diagnostics, false)
        ));
    }
    Ok(Imported { text, warnings })
}
