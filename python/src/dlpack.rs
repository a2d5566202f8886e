//! DLPack: tensors of other frameworks (PyTorch, JAX, CuPy, ...) read in
//! place through their `__dlpack__` method, and outputs handed back to the
//! same framework through its `from_dlpack`.
//!
//! The structs are the DLPack 0.8 ABI of the unversioned `"dltensor"`
//! capsule, which every producer returns when the consumer asks for no
//! version (`x.__dlpack__()` with no arguments). Taking the capsule makes
//! this module the tensor's owner: it renames the capsule
//! `"used_dltensor"` (so the capsule's destructor does not free the tensor
//! as well) and calls the tensor's deleter when it is done with the data.

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use std::ffi::{c_void, CStr};
use std::ptr::NonNull;

/// `kDLCPU`, and `kDLCUDAHost` (pinned host memory, readable by the CPU).
const DEVICE_CPU: i32 = 1;
const DEVICE_CUDA_HOST: i32 = 3;
/// `kDLFloat`.
const CODE_FLOAT: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

/// A 2-D float32 host tensor taken from a DLPack capsule, read in place;
/// its producer's deleter runs when this is dropped.
pub struct DlpackTensor {
    managed: NonNull<DlManagedTensor>,
    data: *const f32,
    len: usize,
}

impl Drop for DlpackTensor {
    fn drop(&mut self) {
        // SAFETY: `managed` came from a capsule this value took over (renamed
        // `used_dltensor`), so nothing else calls the deleter; DLPack says
        // the consumer calls it exactly once when done.
        unsafe {
            if let Some(deleter) = (*self.managed.as_ptr()).deleter {
                deleter(self.managed.as_ptr());
            }
        }
    }
}

impl DlpackTensor {
    /// The tensor's values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `take` checked that `data` is non-null, 4-byte aligned and
        // the start of `len` contiguous float32 values of a host tensor,
        // which its producer keeps alive until the deleter runs (on drop).
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }

    /// Takes `x` (any object with `__dlpack__`) as a C-contiguous float32
    /// host tensor of `shape`; anything else is a `ValueError` saying what
    /// differs.
    pub fn take(x: &Bound<'_, PyAny>, shape: [usize; 2], what: &str) -> PyResult<DlpackTensor> {
        if let Ok(device) = x.call_method0("__dlpack_device__") {
            let (kind, id): (i32, i32) = device.extract()?;
            if kind != DEVICE_CPU && kind != DEVICE_CUDA_HOST {
                return Err(PyValueError::new_err(format!(
                    "{what}: a tensor on {} (DLPack device {kind}, {id}); the CPU backend reads host memory (move it with .cpu())",
                    device_name(kind)
                )));
            }
        }
        let capsule = x.call_method0("__dlpack__")?;
        let capsule = capsule.downcast::<PyCapsule>().map_err(|_| {
            PyValueError::new_err(format!("{what}: `__dlpack__` did not return a capsule"))
        })?;
        let name = capsule.name()?;
        if name != Some(c"dltensor") {
            return Err(PyValueError::new_err(format!(
                "{what}: a DLPack capsule named {name:?}, expected \"dltensor\" (an unused tensor)"
            )));
        }
        let managed = NonNull::new(capsule.pointer().cast::<DlManagedTensor>())
            .ok_or_else(|| PyValueError::new_err(format!("{what}: an empty DLPack capsule")))?;
        // SAFETY: `capsule` is a live capsule object; the name is a static C
        // string, as PyCapsule_SetName requires (it keeps the pointer).
        let renamed = unsafe { ffi::PyCapsule_SetName(capsule.as_ptr(), USED.as_ptr()) };
        if renamed != 0 {
            return Err(PyErr::fetch(x.py()));
        }
        // From here this value owns the tensor: an error below drops it,
        // which runs the producer's deleter.
        let mut tensor = DlpackTensor {
            managed,
            data: std::ptr::null(),
            len: 0,
        };
        // SAFETY: a "dltensor" capsule holds a DLManagedTensor that stays
        // valid until its deleter runs, which only `tensor`'s drop does.
        let t = unsafe { &(*managed.as_ptr()).dl_tensor };
        let (data, len) = checked_layout(t, shape, what)?;
        tensor.data = data;
        tensor.len = len;
        Ok(tensor)
    }
}

static USED: &CStr = c"used_dltensor";

/// The data pointer and length of a DLPack tensor that is a host,
/// float32, C-contiguous `[rows, cols]` array of `shape`.
fn checked_layout(t: &DlTensor, shape: [usize; 2], what: &str) -> PyResult<(*const f32, usize)> {
    let bad = |m: String| PyValueError::new_err(format!("{what}: {m}"));
    if t.device.device_type != DEVICE_CPU && t.device.device_type != DEVICE_CUDA_HOST {
        return Err(bad(format!(
            "a tensor on {}; the CPU backend reads host memory (move it with .cpu())",
            device_name(t.device.device_type)
        )));
    }
    let dt = t.dtype;
    if (dt.code, dt.bits, dt.lanes) != (CODE_FLOAT, 32, 1) {
        return Err(bad(format!(
            "a tensor of DLPack dtype (code {}, {} bits, {} lanes), expected float32 (convert it with .float())",
            dt.code, dt.bits, dt.lanes
        )));
    }
    if t.ndim != 2 || t.shape.is_null() {
        return Err(bad(format!(
            "a {}-D tensor, expected 2-D [{}, {}]",
            t.ndim, shape[0], shape[1]
        )));
    }
    // SAFETY: DLPack's `shape` (and `strides`, when not null) hold `ndim`
    // values; `ndim` is 2 here.
    let (dims, strides) = unsafe {
        let dims = [*t.shape, *t.shape.add(1)];
        let strides = if t.strides.is_null() {
            None
        } else {
            Some([*t.strides, *t.strides.add(1)])
        };
        (dims, strides)
    };
    let want = shape.map(|d| d as i64);
    if dims != want {
        return Err(bad(format!("shape {dims:?}, the layer needs {want:?}")));
    }
    let contiguous = match strides {
        None => true,
        // A dimension of one element may have any stride.
        Some([s0, s1]) => (s1 == 1 || dims[1] <= 1) && (s0 == dims[1] || dims[0] <= 1),
    };
    if !contiguous {
        return Err(bad(format!(
            "strides {:?}: not C-contiguous (pass x.contiguous())",
            strides.unwrap_or_default()
        )));
    }
    let len = shape[0] * shape[1];
    if len == 0 {
        return Ok((std::ptr::null(), 0));
    }
    let offset = usize::try_from(t.byte_offset)
        .map_err(|_| bad("a byte offset beyond this machine's addresses".into()))?;
    let data = (t.data as *const u8).wrapping_add(offset);
    if data.is_null() || (data as usize) % std::mem::align_of::<f32>() != 0 {
        return Err(bad("the tensor's data is null or not 4-byte aligned".into()));
    }
    Ok((data.cast::<f32>(), len))
}

fn device_name(kind: i32) -> &'static str {
    match kind {
        2 => "a CUDA device",
        4 => "an OpenCL device",
        7 => "a Vulkan device",
        8 => "a Metal device",
        10 => "a ROCm device",
        _ => "a device that is not the CPU",
    }
}

/// `values` (a NumPy array) handed to the framework `like` came from: its
/// top-level module's `from_dlpack` (PyTorch's `torch.from_dlpack`, which
/// shares the array's memory), or the NumPy array itself when that module
/// has none.
pub fn to_framework_of<'py>(
    like: &Bound<'py, PyAny>,
    values: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let module: String = like.get_type().getattr("__module__")?.extract()?;
    let top = module.split('.').next().unwrap_or_default();
    let Ok(framework) = like.py().import(top) else {
        return Ok(values);
    };
    match framework.getattr("from_dlpack") {
        Ok(from) => from.call1((values,)),
        Err(_) => Ok(values),
    }
}
