//! `moec._moec`: the Rust side of the `moec` Python package.
//!
//! Everything a caller passes is checked here before it reaches the
//! compiler or the runtime: a Rust error becomes `moec.MoeError` with the
//! same text, a wrong argument a `ValueError` or `TypeError`, and nothing
//! a caller passes can panic the interpreter. A forward pass releases the
//! GIL and reads a C-contiguous float32 NumPy array, or any framework's
//! tensor through DLPack (`dlpack.rs`), in place (one slice per rank,
//! straight into the ranks' memory).

mod cuda;
mod dlpack;

use moec::compile::{compile as compile_program, Compiled, Options};
use moec::run::{apply, Overrides};
use moec_runtime::cpu::CpuOptions;
use moec_runtime::weights::LayerWeights;
use moec_runtime::{Forward, Layer as RtLayer, Weights};
use numpy::{PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::Path;

create_exception!(
    _moec,
    MoeError,
    PyException,
    "A .moe file that does not check or compile, a plan or weights that cannot be used, or a pass that fails; the message is moec's."
);

fn moe_error(message: impl Into<String>) -> PyErr {
    MoeError::new_err(message.into())
}

/// A `.moe` file's text and the name diagnostics give it: `source` is a
/// path when such a file exists, the text itself otherwise.
fn source_of(source: &str) -> PyResult<(String, String)> {
    let path = Path::new(source);
    if !source.contains('\n') && path.is_file() {
        let text = moec_runtime::files::read_to_string(path)
            .map_err(|e| moe_error(format!("cannot read `{source}`: {e}")))?;
        return Ok((source.to_string(), text));
    }
    Ok(("<text>".to_string(), source.to_string()))
}

/// Checks `source` and returns its program, or raises `MoeError` with the
/// rendered diagnostics (file, line, column, the line, a hint).
fn checked(source: &str) -> PyResult<moec_lang::Program> {
    let (name, text) = source_of(source)?;
    let checked = moec_lang::check_source(&text);
    match checked.program {
        Some((program, _)) => Ok(program),
        None => Err(moe_error(moec_lang::render(
            &name,
            &text,
            &checked.diagnostics,
            false,
        ))),
    }
}

/// Checks a `.moe` file (a path or its text); raises `MoeError` with every
/// diagnostic when it has errors.
#[pyfunction]
fn check(source: &str) -> PyResult<()> {
    checked(source).map(|_| ())
}

fn dtype_of(name: &str) -> PyResult<moec_lang::spec::DType> {
    use moec_lang::spec::DType;
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::Bf16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(PyValueError::new_err(format!(
            "dtype {other:?}: expected \"f32\", \"bf16\" or \"f16\""
        ))),
    }
}

/// A compiled layer: the plan, its predicted timeline and the compiler's
/// report.
#[pyclass(module = "moec._moec", frozen)]
struct Plan {
    compiled: Compiled,
}

#[pymethods]
impl Plan {
    /// The plan as `moec build` prints it.
    #[getter]
    fn text(&self) -> String {
        self.compiled.plan.to_string()
    }

    /// The plan as `moec build --emit json` writes it (what `Layer` and the
    /// runtime load).
    fn to_json(&self) -> String {
        self.compiled.plan.to_json()
    }

    /// The predicted timeline: the fields of `moec simulate --json`.
    fn simulate<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = self.compiled.simulation_json(false);
        let json = py.import("json")?;
        json.call_method1("loads", (value.to_string(),))
    }

    /// The `moec explain` report.
    fn explain(&self) -> String {
        moec::explain::explain(&self.compiled)
    }

    fn __repr__(&self) -> String {
        let p = &self.compiled.plan;
        format!(
            "<moec.Plan {}: {} ranks, {} chunk(s), predicted {:.1} us>",
            p.layer.name,
            p.mesh.world_size(),
            p.choices.chunks,
            self.compiled.timeline.total_us
        )
    }
}

/// Compiles a `.moe` file (a path or its text), with `moec run`'s
/// overrides; raises `MoeError` when it does not check or compile.
#[pyfunction]
#[pyo3(signature = (source, *, tokens=None, hidden=None, ffn=None, dtype=None, ranks=None))]
fn compile(
    py: Python<'_>,
    source: &str,
    tokens: Option<u64>,
    hidden: Option<u64>,
    ffn: Option<u64>,
    dtype: Option<&str>,
    ranks: Option<u64>,
) -> PyResult<Plan> {
    let mut program = checked(source)?;
    let overrides = Overrides {
        ranks,
        tokens,
        dtype: dtype.map(dtype_of).transpose()?,
        hidden,
        ffn,
    };
    apply(&mut program, &overrides).map_err(moe_error)?;
    let compiled = py
        .allow_threads(|| compile_program(&program, &Options::default()))
        .map_err(moe_error)?;
    Ok(Plan { compiled })
}

/// A layer ready to run: a plan with its weights, on the CPU backend or on
/// the CUDA backend (every rank a virtual rank of this process's GPU).
#[pyclass(module = "moec._moec", frozen)]
struct Layer {
    backend: Backend,
    stats: std::sync::Mutex<Option<Forward>>,
}

enum Backend {
    Cpu(Box<RtLayer>),
    Cuda {
        layer: cuda::CudaLayer,
        plan: Box<moec_runtime::Plan>,
    },
}

impl Backend {
    fn plan(&self) -> &moec_runtime::Plan {
        match self {
            Backend::Cpu(l) => l.plan(),
            Backend::Cuda { plan, .. } => plan,
        }
    }

    fn ranks(&self) -> usize {
        usize::try_from(self.plan().mesh.world_size()).unwrap_or(usize::MAX)
    }

    fn tokens_per_rank(&self) -> usize {
        usize::try_from(self.plan().layer.tokens_per_rank).unwrap_or(usize::MAX)
    }

    fn hidden(&self) -> usize {
        usize::try_from(self.plan().layer.hidden).unwrap_or(usize::MAX)
    }

    fn forward_slices(&self, slices: &[&[f32]]) -> Result<Forward, String> {
        match self {
            Backend::Cpu(l) => l.forward_slices(slices).map_err(|e| e.to_string()),
            Backend::Cuda { layer, .. } => layer.forward(slices),
        }
    }

    fn random_inputs(&self, seed: u64) -> Vec<Vec<f32>> {
        moec_runtime::weights::random_inputs(
            &self.plan().layer,
            self.ranks(),
            self.tokens_per_rank(),
            seed,
        )
    }
}

#[pymethods]
impl Layer {
    #[new]
    #[pyo3(signature = (plan, weights=None, *, seed=0, backend="cpu", prefix=""))]
    fn new(
        py: Python<'_>,
        plan: &Bound<'_, PyAny>,
        weights: Option<&Bound<'_, PyAny>>,
        seed: u64,
        backend: &str,
        prefix: &str,
    ) -> PyResult<Layer> {
        if backend != "cpu" && backend != "cuda" {
            return Err(PyValueError::new_err(format!(
                "backend {backend:?}: expected \"cpu\" or \"cuda\""
            )));
        }
        let plan = match plan.downcast::<Plan>() {
            Ok(p) => p.get().compiled.plan.clone(),
            Err(_) => {
                let json: String = plan.extract().map_err(|_| {
                    PyTypeError::new_err("plan: expected a moec.Plan or a plan's JSON text")
                })?;
                moec_runtime::Plan::from_json(&json).map_err(|e| moe_error(e.to_string()))?
            }
        };
        // A dict of arrays goes through a safetensors file of its own, so
        // it meets the very checks a checkpoint does (names, shapes, values).
        let mut scratch: Option<std::path::PathBuf> = None;
        let weights = match weights {
            None => Weights::Random { seed },
            Some(w) => match w.downcast::<PyDict>() {
                Ok(dict) => {
                    let path = write_dict(dict)?;
                    scratch = Some(path.clone());
                    Weights::File {
                        path,
                        prefix: prefix.to_string(),
                    }
                }
                Err(_) => {
                    let path: String = w.extract().map_err(|_| {
                        PyTypeError::new_err(
                            "weights: expected None, a checkpoint's path or a dict of float32 arrays",
                        )
                    })?;
                    Weights::File {
                        path: path.into(),
                        prefix: prefix.to_string(),
                    }
                }
            },
        };
        let made = py.allow_threads(|| {
            if backend == "cuda" {
                cuda_backend(plan, weights)
            } else {
                RtLayer::from_plan(plan, weights, CpuOptions::default())
                    .map(|l| Backend::Cpu(Box::new(l)))
                    .map_err(|e| e.to_string())
            }
        });
        if let Some(path) = scratch {
            let _ = std::fs::remove_file(path);
        }
        Ok(Layer {
            backend: made.map_err(moe_error)?,
            stats: std::sync::Mutex::new(None),
        })
    }

    /// Where the layer runs: `"cpu"`, or the GPU the CUDA backend uses.
    #[getter]
    fn device(&self) -> String {
        match &self.backend {
            Backend::Cpu(_) => "cpu".into(),
            Backend::Cuda { layer, .. } => layer.device.clone(),
        }
    }

    /// Ranks of the layer (tensors per pass).
    #[getter]
    fn ranks(&self) -> usize {
        self.backend.ranks()
    }

    #[getter]
    fn tokens_per_rank(&self) -> usize {
        self.backend.tokens_per_rank()
    }

    #[getter]
    fn hidden(&self) -> usize {
        self.backend.hidden()
    }

    /// Runs the layer on `x`: one `[ranks * tokens_per_rank, hidden]`
    /// float32 array (rank-major), or a list of one `[tokens_per_rank,
    /// hidden]` array per rank; returns the output the same way.
    fn forward<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<PyObject> {
        self.__call__(py, x)
    }

    fn __call__<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<PyObject> {
        let (t, h) = (self.backend.tokens_per_rank(), self.backend.hidden());
        let ranks = self.backend.ranks();
        if let Ok(list) = x.downcast::<PyList>() {
            let items: Vec<Bound<'py, PyAny>> = list.iter().collect();
            let inputs: Vec<Input<'py>> = items
                .iter()
                .enumerate()
                .map(|(r, a)| Input::of(a, [t, h], &format!("x[{r}]")))
                .collect::<PyResult<_>>()?;
            if inputs.len() != ranks {
                return Err(PyValueError::new_err(format!(
                    "x: {} arrays for {ranks} ranks",
                    inputs.len()
                )));
            }
            let slices: Vec<&[f32]> = inputs
                .iter()
                .map(Input::as_slice)
                .collect::<PyResult<_>>()?;
            let forward = self.run(py, &slices)?;
            drop(inputs);
            let out = PyList::empty(py);
            for (o, like) in forward.outputs.iter().zip(&items) {
                out.append(output_like(like, output_array(py, o, t, h)?)?)?;
            }
            self.keep(forward);
            return Ok(out.into_any().unbind());
        }
        let input = Input::of(x, [ranks * t, h], "x")?;
        let all = input.as_slice()?;
        let slices: Vec<&[f32]> = all.chunks(t * h).collect();
        let forward = self.run(py, &slices)?;
        drop(input);
        let flat: Vec<f32> = forward.outputs.concat();
        let out = output_like(x, output_array(py, &flat, ranks * t, h)?)?;
        self.keep(forward);
        Ok(out.unbind())
    }

    /// The routing of the last pass: `tokens_per_expert`, `dropped`,
    /// `assignments`, `imbalance` (the busiest expert over the mean), and
    /// `grown` (whether a dropless pass re-ran on grown buffers).
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let kept = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = kept.as_ref() {
            d.set_item("tokens_per_expert", f.stats.routed_per_expert.clone())?;
            d.set_item("dropped", f.stats.dropped)?;
            d.set_item("assignments", f.stats.assignments)?;
            d.set_item("imbalance", f.stats.imbalance())?;
            d.set_item("grown", f.grown.is_some())?;
        }
        Ok(d)
    }

    /// The address of the data a pass would read for a one-array `x`: the
    /// array's own (the tests check there is no copy).
    fn _input_address(&self, x: &Bound<'_, PyAny>) -> PyResult<usize> {
        let (t, h) = (self.backend.tokens_per_rank(), self.backend.hidden());
        let input = Input::of(x, [self.backend.ranks() * t, h], "x")?;
        Ok(input.as_slice()?.as_ptr() as usize)
    }

    fn __repr__(&self) -> String {
        format!(
            "<moec.Layer {}: {} ranks x {} tokens, hidden {}>",
            self.backend.plan().layer.name,
            self.backend.ranks(),
            self.backend.tokens_per_rank(),
            self.backend.hidden()
        )
    }
}

impl Layer {
    /// One pass with the GIL released (the arrays stay borrowed: `frozen`
    /// NumPy readonly views keep them alive and unwritten meanwhile).
    fn run(&self, py: Python<'_>, slices: &[&[f32]]) -> PyResult<Forward> {
        py.allow_threads(|| self.backend.forward_slices(slices))
            .map_err(moe_error)
    }

    fn keep(&self, forward: Forward) {
        let mut slot = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Forward {
            outputs: Vec::new(),
            ..forward
        });
    }
}

/// The CUDA backend of `plan`: the weights read or drawn here, the backend
/// made on a thread of its own (the CUDA backend's error when there is no
/// driver or GPU).
fn cuda_backend(plan: moec_runtime::Plan, weights: Weights) -> Result<Backend, String> {
    plan.validate().map_err(|e| e.to_string())?;
    let w = weights.resolve(&plan.layer).map_err(|e| e.to_string())?;
    let layer = cuda::CudaLayer::new(plan.clone(), w)?;
    Ok(Backend::Cuda {
        layer,
        plan: Box::new(plan),
    })
}

/// Writes a dict of float32 arrays (Hugging Face names) to a safetensors
/// file in the temporary directory and returns its path.
fn write_dict(dict: &Bound<'_, PyDict>) -> PyResult<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(dict.len());
    for (name, value) in dict.iter() {
        let name: String = name
            .extract()
            .map_err(|_| PyTypeError::new_err("weights: every key must be a tensor name (str)"))?;
        let array = value
            .downcast::<numpy::PyArrayDyn<f32>>()
            .map_err(|_| {
                PyValueError::new_err(format!("weights[{name:?}]: expected a float32 NumPy array"))
            })?
            .readonly();
        let values = array.as_array();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((name, array.shape().to_vec(), bytes));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (name, shape, bytes) in &owned {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| PyValueError::new_err(format!("weights[{name:?}]: {e}")))?;
        views.push((name.as_str(), view));
    }
    let path = std::env::temp_dir().join(format!(
        "moec-python-weights-{}-{}.safetensors",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    safetensors::serialize_to_file(views, None, &path).map_err(|e| {
        moe_error(format!(
            "cannot write the weights to {}: {e}",
            path.display()
        ))
    })?;
    Ok(path)
}

/// One input of a pass, read in place: a NumPy array, or another
/// framework's tensor through DLPack.
enum Input<'py> {
    Numpy(PyReadonlyArray2<'py, f32>),
    Dlpack(dlpack::DlpackTensor),
}

impl<'py> Input<'py> {
    /// `x` as a C-contiguous float32 host array of `shape`: a NumPy array,
    /// or any object with `__dlpack__` (a PyTorch tensor, ...); anything
    /// else is a `ValueError` saying what differs (never a silent copy).
    fn of(x: &Bound<'py, PyAny>, shape: [usize; 2], what: &str) -> PyResult<Input<'py>> {
        if x.downcast::<PyArray2<f32>>().is_err() && x.hasattr("__dlpack__")? && !is_numpy(x) {
            return dlpack::DlpackTensor::take(x, shape, what).map(Input::Dlpack);
        }
        array_of(x, shape, what).map(Input::Numpy)
    }

    fn as_slice(&self) -> PyResult<&[f32]> {
        match self {
            Input::Numpy(a) => a
                .as_slice()
                .map_err(|e| PyValueError::new_err(e.to_string())),
            Input::Dlpack(t) => Ok(t.as_slice()),
        }
    }
}

/// A NumPy array of any dtype or rank (refused by `array_of` with what is
/// wrong, rather than through DLPack).
fn is_numpy(x: &Bound<'_, PyAny>) -> bool {
    x.get_type()
        .getattr("__module__")
        .and_then(|m| m.extract::<String>())
        .is_ok_and(|m| m == "numpy")
}

/// The output of a pass in the type of its input: NumPy for NumPy, the
/// producer's framework for a DLPack tensor (shared, not copied).
fn output_like<'py>(
    like: &Bound<'py, PyAny>,
    out: Bound<'py, PyArray2<f32>>,
) -> PyResult<Bound<'py, PyAny>> {
    if like.downcast::<PyArray2<f32>>().is_ok() || is_numpy(like) {
        return Ok(out.into_any());
    }
    dlpack::to_framework_of(like, out.into_any())
}

/// `x` as a C-contiguous float32 array of `shape`, read in place; anything
/// else is a `ValueError` saying what differs (never a silent copy).
fn array_of<'py>(
    x: &Bound<'py, PyAny>,
    shape: [usize; 2],
    what: &str,
) -> PyResult<PyReadonlyArray2<'py, f32>> {
    let Ok(array) = x.downcast::<PyArray2<f32>>() else {
        let dtype = x
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| x.get_type().to_string());
        let ndim = x.getattr("ndim").map(|d| d.to_string()).unwrap_or_default();
        return Err(PyValueError::new_err(format!(
            "{what}: expected a 2-D float32 NumPy array or DLPack tensor, got {dtype} with {} dimension(s)",
            if ndim.is_empty() { "?".into() } else { ndim }
        )));
    };
    if array.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "{what}: shape {:?}, the layer needs {:?}",
            array.shape(),
            shape
        )));
    }
    if !array.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what}: not C-contiguous (pass np.ascontiguousarray(x))"
        )));
    }
    Ok(array.readonly())
}

fn output_array<'py>(
    py: Python<'py>,
    values: &[f32],
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let flat = numpy::PyArray1::from_slice(py, values);
    flat.reshape([rows, cols])
}

/// Random inputs for a layer (uniform in [-1, 1), rounded to its dtype):
/// one `[ranks * tokens_per_rank, hidden]` float32 array.
#[pyfunction]
#[pyo3(signature = (layer, seed=0))]
fn random_inputs<'py>(
    py: Python<'py>,
    layer: &Layer,
    seed: u64,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let b = &layer.backend;
    let inputs = b.random_inputs(seed);
    let (t, h) = (b.tokens_per_rank(), b.hidden());
    output_array(py, &inputs.concat(), b.ranks() * t, h)
}

/// Every weight of a layer built with `seed` (as `Layer(plan, seed=seed)`
/// draws them), by its Hugging Face name: for checking a layer against
/// another implementation on the same weights.
#[pyfunction]
#[pyo3(signature = (plan, seed=0))]
fn random_weights<'py>(py: Python<'py>, plan: &Plan, seed: u64) -> PyResult<Bound<'py, PyDict>> {
    let weights = LayerWeights::random(&plan.compiled.plan.layer, seed);
    let d = PyDict::new(py);
    for (name, shape, data) in weights.tensors() {
        let flat = numpy::PyArray1::from_slice(py, data);
        d.set_item(name, flat.reshape(shape)?)?;
    }
    Ok(d)
}

#[pymodule]
fn _moec(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MoeError", m.py().get_type::<MoeError>())?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(random_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(random_weights, m)?)?;
    m.add_class::<Plan>()?;
    m.add_class::<Layer>()?;
    Ok(())
}
