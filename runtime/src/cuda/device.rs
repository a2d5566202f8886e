//! Finding a GPU before touching the CUDA driver.
//!
//! cudarc loads `libcuda` on its first driver call and panics when the
//! library is missing. [`probe`] therefore asks first whether the library can
//! be opened at all (`cudarc::driver::sys::is_culib_present`, which only tries
//! `dlopen` on the candidate names and cannot panic on a 64-bit target), and
//! only then initialises the driver and counts the devices, with any panic
//! inside cudarc caught and turned into an error, its message and backtrace
//! left unprinted (a `libcuda` that lacks a symbol, say `cuInit`, gets one
//! clean line). A machine without CUDA gets [`NO_DRIVER`], never a panic.

use std::fmt;

/// What `moec run --backend cuda` prints on a machine without a CUDA driver.
pub const NO_DRIVER: &str = "no CUDA driver found; use --backend cpu";

/// Why no GPU can be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// `libcuda` cannot be opened: no NVIDIA driver on this machine.
    NoDriver,
    /// The driver is there but reports no device (or `cuInit` failed).
    NoDevice(String),
    /// A driver call failed.
    Driver(String),
    /// This build of the runtime has no CUDA executor (the `cuda` feature
    /// of `moec-runtime` is off).
    NotBuilt,
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::NoDriver => f.write_str(NO_DRIVER),
            DeviceError::NoDevice(why) => {
                write!(f, "the CUDA driver reports no usable GPU ({why}); use --backend cpu")
            }
            DeviceError::Driver(why) => write!(f, "CUDA driver error: {why}"),
            DeviceError::NotBuilt => f.write_str(
                "this build has no CUDA backend (moec-runtime's `cuda` feature is off); use --backend cpu",
            ),
        }
    }
}

impl std::error::Error for DeviceError {}

/// The GPUs the driver reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Devices visible to this process.
    pub count: usize,
    /// Name and compute capability of device 0.
    pub name: String,
    pub capability: (i32, i32),
    /// The CUDA version the driver supports (`cuDriverGetVersion`), e.g.
    /// `(13, 0)`.
    pub driver: (i32, i32),
}

impl DeviceInfo {
    /// The NVRTC architecture of device 0 (`sm_90` for an H100/H200).
    pub fn arch(&self) -> String {
        arch_of(self.capability)
    }
}

/// The GPU this process uses, out of `visible` devices: `explicit`
/// (`CudaOptions::device`) if given; under a multi-process launch the local
/// rank modulo the visible devices (torchrun shows every GPU of the node to
/// every process, so local rank `i` takes GPU `i`; SLURM with one GPU per
/// task shows each process only its own, so every local rank takes GPU 0);
/// otherwise `env_device` (`MOEC_CUDA_DEVICE`) or 0.
pub fn choose_ordinal(
    explicit: Option<usize>,
    local_rank: Option<usize>,
    env_device: Option<&str>,
    visible: usize,
) -> Result<usize, String> {
    if visible == 0 {
        return Err("no GPU is visible".into());
    }
    let ordinal = match (explicit, local_rank) {
        (Some(d), _) => d,
        (None, Some(local)) => local % visible,
        (None, None) => match env_device.map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => v
                .parse()
                .map_err(|_| format!("MOEC_CUDA_DEVICE={v} is not a GPU number"))?,
            None => 0,
        },
    };
    if ordinal >= visible {
        return Err(format!("GPU {ordinal} does not exist ({visible} visible)"));
    }
    Ok(ordinal)
}

/// `sm_<major><minor>` for a compute capability.
pub fn arch_of(capability: (i32, i32)) -> String {
    format!("sm_{}{}", capability.0, capability.1)
}

/// Whether `libcuda` can be opened, without initialising anything.
pub fn driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: `is_culib_present` only calls `dlopen` on candidate names
        // and drops the handles; opening libcuda runs its initialisers,
        // which set up only the library's own state.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// Finds the driver and the GPUs (see the module docs).
pub fn probe() -> Result<DeviceInfo, DeviceError> {
    #[cfg(feature = "cuda")]
    {
        if !driver_present() {
            return Err(DeviceError::NoDriver);
        }
        guarded(|| {
            use cudarc::driver::{result, sys};
            result::init().map_err(|e| DeviceError::NoDevice(super::driver::describe(e)))?;
            let count = result::device::get_count()
                .map_err(|e| DeviceError::NoDevice(super::driver::describe(e)))?;
            if count <= 0 {
                return Err(DeviceError::NoDevice("0 devices".into()));
            }
            let dev = result::device::get(0)
                .map_err(|e| DeviceError::Driver(super::driver::describe(e)))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "GPU 0".into());
            let attr = |a| {
                // SAFETY: `dev` is a device handle the driver just returned.
                unsafe { result::device::get_attribute(dev, a) }
                    .map_err(|e| DeviceError::Driver(super::driver::describe(e)))
            };
            let mut version = 0;
            // SAFETY: `version` is a valid out-pointer for the call.
            unsafe { sys::cuDriverGetVersion(&mut version) }
                .result()
                .map_err(|e| DeviceError::Driver(super::driver::describe(e)))?;
            let major =
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor =
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            Ok(DeviceInfo {
                count: usize::try_from(count).unwrap_or(0),
                name,
                capability: (major, minor),
                driver: super::nvrtc::split_version(version),
            })
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(DeviceError::NotBuilt)
    }
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from an old
/// driver, say) into an error instead of unwinding through the caller. The
/// panic's message and backtrace are not printed: the error says it.
#[cfg(feature = "cuda")]
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, DeviceError>) -> Result<T, DeviceError> {
    match quietly(f) {
        Ok(r) => r,
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic inside cudarc".into());
            Err(DeviceError::Driver(why))
        }
    }
}

#[cfg(feature = "cuda")]
thread_local! {
    /// Whether this thread is inside [`quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `catch_unwind(f)` with this thread's panic messages silenced for the
/// call. The panic hook is process-wide, so swapping it per call would race
/// between threads (one thread's restore undoing another's swap); instead the
/// first call puts in front of the hook the process has then a filter that
/// drops the panics of threads inside this function and passes every other
/// panic on to that hook, unchanged. Outside a call nothing is filtered.
#[cfg(feature = "cuda")]
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    use std::panic::{catch_unwind, set_hook, take_hook, AssertUnwindSafe};
    static FILTER: std::sync::Once = std::sync::Once::new();
    FILTER.call_once(|| {
        let previous = take_hook();
        set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = QUIET.with(|q| q.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(outer));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_answers_without_panicking() {
        match probe() {
            Ok(info) => {
                assert!(info.count >= 1);
                assert!(info.arch().starts_with("sm_"));
            }
            Err(DeviceError::NoDriver) => {
                assert!(!driver_present());
                assert_eq!(DeviceError::NoDriver.to_string(), NO_DRIVER);
            }
            Err(e) => {
                // A driver without a GPU (or a build without CUDA): an error
                // that says what to do.
                assert!(e.to_string().contains("--backend cpu"), "{e}");
            }
        }
    }

    #[test]
    fn each_process_finds_its_gpu() {
        // torchrun on an 8-GPU node: local rank i takes GPU i.
        assert_eq!(choose_ordinal(None, Some(3), None, 8), Ok(3));
        // SLURM with one GPU per task: each process sees only its own.
        for local in 0..8 {
            assert_eq!(choose_ordinal(None, Some(local), None, 1), Ok(0));
        }
        // Two GPUs per task, four tasks per node.
        assert_eq!(choose_ordinal(None, Some(3), None, 2), Ok(1));
        // A single process: MOEC_CUDA_DEVICE, else 0.
        assert_eq!(choose_ordinal(None, None, Some(" 1 "), 2), Ok(1));
        assert_eq!(choose_ordinal(None, None, None, 2), Ok(0));
        // An explicit device wins, and must exist.
        assert_eq!(choose_ordinal(Some(1), Some(0), None, 2), Ok(1));
        let e = choose_ordinal(Some(2), None, None, 2).unwrap_err();
        assert_eq!(e, "GPU 2 does not exist (2 visible)");
        assert!(choose_ordinal(None, None, Some("x"), 2).is_err());
        assert!(choose_ordinal(None, Some(0), None, 0).is_err());
    }

    /// A `libcuda.so` that exports nothing (no `cuInit`): cudarc opens it,
    /// then panics on the missing symbol. The probe reports a clean error and
    /// nothing of the panic reaches the output. The library must be found
    /// by the loader at start-up, so the check runs in a child process (this
    /// test binary again, with `LD_LIBRARY_PATH` pointing at the fake).
    #[cfg(all(feature = "cuda", target_os = "linux"))]
    #[test]
    fn a_libcuda_without_cuinit_is_a_clean_error() {
        const CHILD: &str = "MOEC_FAKE_LIBCUDA_CHILD";
        const AFTER: &str = "a panic after the probe still prints";
        if std::env::var_os(CHILD).is_some() {
            let e = probe().expect_err("a libcuda without symbols cannot work");
            println!("probe: {e}");
            // Outside the probe this thread's panics print as before.
            assert!(!QUIET.with(std::cell::Cell::get));
            let _ = std::panic::catch_unwind(|| panic!("{AFTER}"));
            return;
        }
        let dir = std::env::temp_dir().join(format!("moec-fake-libcuda-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let source = dir.join("fake.c");
        std::fs::write(&source, "int moec_fake_libcuda_exports_no_cuda_symbol;\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let built = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join("libcuda.so"))
            .arg(&source)
            .status();
        if !built.is_ok_and(|s| s.success()) {
            eprintln!("skipped: no C compiler (`cc`) to build a fake libcuda");
            return;
        }
        std::fs::copy(dir.join("libcuda.so"), dir.join("libcuda.so.1"))
            .unwrap_or_else(|e| panic!("{e}"));
        let path = match std::env::var("LD_LIBRARY_PATH") {
            Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
            _ => dir.display().to_string(),
        };
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        let out = std::process::Command::new(exe)
            .args([
                "cuda::device::tests::a_libcuda_without_cuinit_is_a_clean_error",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("LD_LIBRARY_PATH", path)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_dir_all(&dir);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("probe: CUDA driver error:")
                || stdout.contains("probe: the CUDA driver reports"),
            "{stdout}"
        );
        // cudarc's panic is silent; the one printed is the child's own.
        assert!(stderr.contains(AFTER), "{stderr}");
        assert_eq!(stderr.matches("panicked at").count(), 1, "{stderr}");
        assert!(
            !stdout.contains("panicked at") && !stderr.contains("cudarc"),
            "{stdout}\n{stderr}"
        );
    }

    #[test]
    fn architectures_follow_the_capability() {
        assert_eq!(arch_of((9, 0)), "sm_90");
        assert_eq!(arch_of((12, 0)), "sm_120");
    }
}
