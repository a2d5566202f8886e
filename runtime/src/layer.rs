//! The embedding API: a compiled MoE layer that an application loads and runs.
//!
//! A [`Layer`] is a plan (from a JSON file that `moec build --emit json`
//! wrote, from JSON text, or a [`Plan`] value) made ready to run with its
//! [`Weights`]. [`Layer::forward`] takes one `[tokens_per_rank, hidden]`
//! tensor per rank and returns a [`Forward`]: the outputs, the routing
//! statistics and the timings. Every failure is an [`Error`], so `?` works in
//! an application's `main`.
//!
//! Only the CPU backend exists today; the layer runs every rank as a thread
//! of this process (see the book's runtime chapter).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::cpu::{CpuBackend, CpuOptions, ExecError, Forward};
use crate::footprint::{Budget, Footprint, MemoryError};
use crate::plan::{Plan, PlanError};
use crate::weights::{random_inputs, LayerWeights, WeightsError};

/// Where a layer's weights come from.
#[derive(Clone, Debug)]
// `Given` holds the weights' vectors inline; a `Weights` is built once per layer.
#[allow(clippy::large_enum_variant)]
pub enum Weights {
    /// Drawn from `seed` ([`LayerWeights::random`]): reproducible, no download.
    Random { seed: u64 },
    /// Read from a Hugging Face safetensors checkpoint ([`LayerWeights::load`]):
    /// a `.safetensors` file, a sharded checkpoint's
    /// `model.safetensors.index.json`, or a directory holding either. Tensor
    /// names are `prefix` followed by the Hugging Face names (e.g. prefix
    /// `model.layers.3.`).
    File { path: PathBuf, prefix: String },
    /// MoE layer `layer` of a checkpoint ([`LayerWeights::load_layer`]): the
    /// prefix of its names is found in the file (`model.layers.3.`,
    /// `language_model.model.layers.3.`, ...).
    FileLayer { path: PathBuf, layer: u64 },
    /// Built by the application; checked against the plan's layer
    /// ([`LayerWeights::check`]).
    Given(LayerWeights),
}

impl Weights {
    /// The weights of `layer`: drawn, read from the checkpoint, or the given
    /// ones checked against the layer (what every backend is prepared with).
    ///
    /// Errors: [`Error::Weights`] when the file cannot be read or the
    /// weights do not fit the layer.
    pub fn resolve(self, layer: &crate::plan::LayerConfig) -> Result<LayerWeights, Error> {
        Ok(match self {
            Weights::Random { seed } => LayerWeights::random(layer, seed),
            Weights::File { path, prefix } => LayerWeights::load(&path, layer, &prefix)?,
            Weights::FileLayer { path, layer: n } => LayerWeights::load_layer(&path, layer, n)?,
            Weights::Given(w) => {
                w.check(layer)?;
                w
            }
        })
    }
}

/// Anything that can go wrong loading or running a [`Layer`].
///
/// The message ([`Display`](fmt::Display)) is complete on its own: it names
/// the file when there is one and says what was expected. [`source`]
/// returns the wrapped error.
///
/// [`source`]: std::error::Error::source
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Reading the file at `path` failed (missing, unreadable, not UTF-8).
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The plan was rejected: the text is not JSON of a plan, the plan is of
    /// another format version, or a load check failed. `path` is the file it
    /// was read from, when it was. (Boxed, so that an `Error` stays small in
    /// the `Result`s of applications.)
    Plan {
        path: Option<PathBuf>,
        source: Box<PlanError>,
    },
    /// The weights could not be read or do not fit the plan's layer.
    Weights(WeightsError),
    /// The layer needs more memory than the budget
    /// ([`CpuOptions::memory_budget`], else what the machine has available);
    /// nothing was allocated.
    Memory(MemoryError),
    /// The backend could not prepare the plan, or a forward pass failed (for
    /// instance inputs of the wrong shape or with a NaN).
    Exec(ExecError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Plan {
                path: Some(path),
                source,
            } => write!(f, "{}: {source}", path.display()),
            Error::Plan { path: None, source } => write!(f, "{source}"),
            Error::Weights(e) => write!(f, "{e}"),
            Error::Memory(e) => write!(f, "{e}"),
            Error::Exec(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Plan { source, .. } => Some(&**source),
            Error::Weights(e) => Some(e),
            Error::Memory(e) => Some(e),
            Error::Exec(e) => Some(e),
        }
    }
}

impl From<PlanError> for Error {
    fn from(source: PlanError) -> Error {
        Error::Plan {
            path: None,
            source: Box::new(source),
        }
    }
}

impl From<WeightsError> for Error {
    fn from(e: WeightsError) -> Error {
        Error::Weights(e)
    }
}

impl From<ExecError> for Error {
    fn from(e: ExecError) -> Error {
        Error::Exec(e)
    }
}

fn input_error(message: String) -> Error {
    Error::Exec(ExecError {
        rank: None,
        op: None,
        message,
    })
}

/// A compiled MoE layer, ready to run: a validated plan, its weights laid out
/// and its kernels compiled.
///
/// Build it once and call [`forward`](Layer::forward) as often as needed;
/// passes are independent and deterministic (the same inputs give the same
/// outputs, bit for bit).
///
/// The [crate-level documentation](crate) has a complete example.
pub struct Layer {
    backend: CpuBackend,
    tokens_per_rank: usize,
    hidden: usize,
}

impl Layer {
    /// Loads the JSON plan at `path` (as written by `moec build --emit json`)
    /// and prepares it with `weights`.
    ///
    /// Errors: [`Error::Io`] when the file cannot be read, [`Error::Plan`]
    /// (naming the file) when it is not a valid plan of this runtime's format
    /// version, and those of [`Layer::from_plan`].
    pub fn from_plan_file(
        path: impl AsRef<Path>,
        weights: Weights,
        options: CpuOptions,
    ) -> Result<Layer, Error> {
        let path = path.as_ref();
        let text = crate::files::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let plan = Plan::from_json(&text).map_err(|source| Error::Plan {
            path: Some(path.to_path_buf()),
            source: Box::new(source),
        })?;
        Layer::from_plan(plan, weights, options)
    }

    /// Parses a JSON plan from `json` and prepares it with `weights`; errors
    /// as [`Layer::from_plan_file`], without a path.
    pub fn from_plan_json(
        json: &str,
        weights: Weights,
        options: CpuOptions,
    ) -> Result<Layer, Error> {
        Layer::from_plan(Plan::from_json(json)?, weights, options)
    }

    /// Prepares `plan` (for instance one the compiler just produced) with
    /// `weights`: validates the plan, sizes what it will hold against the
    /// memory budget, reads or draws the weights, checks them against the
    /// plan's layer, lays them out and compiles the kernels.
    ///
    /// Errors: [`Error::Plan`] when the plan does not validate,
    /// [`Error::Memory`] when the layer (weights, every rank's activations,
    /// inputs and outputs) exceeds [`CpuOptions::memory_budget`] or, without
    /// one, the memory this machine has available,
    /// [`Error::Weights`] when the weights cannot be read or do not fit the
    /// layer, [`Error::Exec`] when the CPU backend cannot run the plan (a
    /// hierarchical collective, a mesh too large for this machine).
    pub fn from_plan(plan: Plan, weights: Weights, options: CpuOptions) -> Result<Layer, Error> {
        plan.validate()?;
        Footprint::of(&plan)
            .check(Budget::host(options.memory_budget))
            .map_err(Error::Memory)?;
        let weights = weights.resolve(&plan.layer)?;
        let too_large = |what: &str| input_error(format!("{what} does not fit this machine"));
        let tokens_per_rank = usize::try_from(plan.layer.tokens_per_rank)
            .map_err(|_| too_large("tokens_per_rank"))?;
        let hidden = usize::try_from(plan.layer.hidden).map_err(|_| too_large("hidden"))?;
        let backend = CpuBackend::new(plan, &weights, options)?;
        Ok(Layer {
            backend,
            tokens_per_rank,
            hidden,
        })
    }

    /// Runs the layer on `inputs`: one row-major `[tokens_per_rank, hidden]`
    /// f32 tensor per rank, in rank order. Every rank runs as a group of
    /// threads, one per stream of the plan.
    ///
    /// The [`Forward`] holds one `[tokens_per_rank, hidden]` output per rank
    /// (values rounded to the layer's dtype), the routing statistics summed
    /// over ranks, and the time per phase and in total.
    ///
    /// Errors: [`Error::Exec`] when there is not one tensor per rank, a
    /// tensor has the wrong length or a non-finite value (the message names
    /// the rank and, for a NaN, the token and column), or a rank fails.
    pub fn forward(&self, inputs: &[Vec<f32>]) -> Result<Forward, Error> {
        Ok(self.backend.forward(inputs)?)
    }

    /// [`forward`](Layer::forward) on borrowed tensors, one `[tokens_per_rank,
    /// hidden]` slice per rank, read without a copy of their own.
    pub fn forward_slices(&self, inputs: &[&[f32]]) -> Result<Forward, Error> {
        Ok(self.backend.forward_slices(inputs)?)
    }

    /// Runs the layer on one global `[ranks * tokens_per_rank, hidden]` tensor
    /// in rank-major order (rank 0's tokens first) and returns the output in
    /// the same layout: [`forward`](Layer::forward) on the per-rank slices,
    /// with the outputs concatenated. Use `forward` for the routing
    /// statistics and timings.
    ///
    /// Errors: as [`forward`](Layer::forward), and [`Error::Exec`] when `x`
    /// does not hold `ranks * tokens_per_rank * hidden` values.
    ///
    /// ```
    /// # use moec_runtime::{CpuOptions, Layer, Weights};
    /// # let json = include_str!("../tests/fixtures/tiny.plan.json");
    /// # let layer = Layer::from_plan_json(json, Weights::Random { seed: 0 }, CpuOptions::default())?;
    /// let rows = layer.ranks() * layer.tokens_per_rank();
    /// let x = vec![0.5f32; rows * layer.hidden()];
    /// let y = layer.forward_global(&x)?;
    /// assert_eq!(y.len(), x.len());
    /// # Ok::<(), moec_runtime::Error>(())
    /// ```
    pub fn forward_global(&self, x: &[f32]) -> Result<Vec<f32>, Error> {
        let ranks = self.ranks();
        let per_rank = self.tokens_per_rank.saturating_mul(self.hidden);
        if per_rank == 0 || x.len() != ranks.saturating_mul(per_rank) {
            return Err(input_error(format!(
                "the global input holds {} values, [{} ranks x {} tokens, {}] needs {}",
                x.len(),
                ranks,
                self.tokens_per_rank,
                self.hidden,
                ranks.saturating_mul(per_rank)
            )));
        }
        let inputs: Vec<Vec<f32>> = x.chunks(per_rank).map(<[f32]>::to_vec).collect();
        let forward = self.forward(&inputs)?;
        Ok(forward.outputs.concat())
    }

    /// Random inputs for this layer, one `[tokens_per_rank, hidden]` tensor
    /// per rank, uniform in `[-1, 1)` and rounded to the layer's dtype
    /// ([`random_inputs`]): for trying a layer out and for benchmarks.
    pub fn random_inputs(&self, seed: u64) -> Vec<Vec<f32>> {
        random_inputs(&self.plan().layer, self.ranks(), self.tokens_per_rank, seed)
    }

    /// The number of ranks: input and output tensors per pass.
    pub fn ranks(&self) -> usize {
        self.backend.ranks()
    }

    /// Tokens each rank's tensor holds (rows).
    pub fn tokens_per_rank(&self) -> usize {
        self.tokens_per_rank
    }

    /// The hidden size (columns of every input and output row).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The plan the layer runs: its layer numerics (`plan().layer`), mesh,
    /// the compiler's choices, streams and memory.
    pub fn plan(&self) -> &Plan {
        self.backend.plan()
    }

    /// The CPU backend underneath, for what the layer does not wrap (such as
    /// [`CpuBackend::forward_shuffled`], the race check).
    pub fn backend(&self) -> &CpuBackend {
        &self.backend
    }
}

impl fmt::Debug for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layer")
            .field("layer", &self.plan().layer.name)
            .field("ranks", &self.ranks())
            .field("tokens_per_rank", &self.tokens_per_rank)
            .field("hidden", &self.hidden)
            .finish_non_exhaustive()
    }
}
