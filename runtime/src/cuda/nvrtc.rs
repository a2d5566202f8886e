//! NVRTC, loaded at run time: CUDA C to PTX without the CUDA toolkit and
//! without a GPU.
//!
//! [`Nvrtc::load`] finds `libnvrtc` ([`locate`]), opens it with `libloading`
//! and resolves the handful of entry points moec calls; a missing library is
//! an error value ([`NvrtcError::NotFound`]), never a panic, so a build
//! without CUDA runs everything else. [`Nvrtc::compile`] compiles one
//! translation unit for one architecture with the options the generated
//! source is written for ([`moec_kernels::cuda::NVRTC_OPTIONS`]) and returns
//! the PTX and, for a real architecture (`sm_90`), the cubin, or NVRTC's log
//! in the error.
//!
//! # PTX or cubin
//!
//! The executor loads the cubin: the driver JIT-compiles PTX only up to its
//! own CUDA version, and an NVRTC newer than the driver (pip's NVRTC 13.2
//! beside a 13.0 driver) writes PTX that driver refuses
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), while its cubin for the device's
//! exact architecture runs under CUDA's minor-version compatibility.
//! [`driver_compatible`] refuses an NVRTC of a newer major version than the
//! driver, whose cubins no driver of the older major loads.
//!
//! # Where the library is looked for
//!
//! 1. `MOEC_NVRTC_LIB`: the library file itself.
//! 2. `MOEC_CUDA_HOME`, then `CUDA_HOME`, `CUDA_PATH`: a folder holding the
//!    PyPI wheel layout (`pip install --target DIR nvidia-cuda-nvrtc` gives
//!    `DIR/nvidia/cu13/lib/libnvrtc.so.13`; `DIR/nvidia/cuda_nvrtc/lib` for
//!    CUDA 12 wheels) or a toolkit (`DIR/lib64/libnvrtc.so`).
//! 3. `/usr/local/cuda`, then the dynamic loader's own search
//!    (`libnvrtc.so.13`, `.so.12`, `.so`; `LD_LIBRARY_PATH` and `ld.so.conf`).
//!
//! Headers: `MOEC_CUDA_INCLUDE` (a folder), else the `include` folder beside
//! the library's `lib` folder when there is one. moec's generated source
//! includes no header, so none is needed today; the include path is passed
//! for kernels that will (`cuda_bf16.h` comes with `nvidia-cuda-runtime`).
//!
//! NVRTC loads its companion `libnvrtc-builtins` by name at compile time;
//! outside a toolkit installed system-wide the loader would not find it, so
//! [`Nvrtc::load`] opens the one beside the library first (the dynamic loader
//! then reuses it).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};

use libloading::Library;

/// The message when no library is found, as `moec kernels --check` prints it.
pub const NOT_FOUND: &str = "libnvrtc not found; set MOEC_NVRTC_LIB or install nvidia-cuda-nvrtc";

/// Why NVRTC could not be loaded or a source not compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NvrtcError {
    /// No library at any place [`locate`] looks; the places tried.
    NotFound { tried: Vec<String> },
    /// A library was found but cannot be used.
    Load { path: String, message: String },
    /// The architecture is not `sm_<digits>` or `compute_<digits>` (with an
    /// optional `a`/`f` suffix).
    BadArch(String),
    /// The source or an option holds a NUL byte.
    BadInput(String),
    /// The compilation failed: NVRTC's result and its log.
    Compile { message: String, log: String },
    /// Another NVRTC call failed.
    Api { call: &'static str, message: String },
}

impl fmt::Display for NvrtcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NvrtcError::NotFound { .. } => write!(f, "{NOT_FOUND}"),
            NvrtcError::Load { path, message } => {
                write!(f, "cannot load NVRTC from {path}: {message}")
            }
            NvrtcError::BadArch(a) => write!(
                f,
                "`{a}` is not a GPU architecture (expected sm_90, compute_90, sm_90a, ...)"
            ),
            NvrtcError::BadInput(why) => write!(f, "cannot pass to NVRTC: {why}"),
            NvrtcError::Compile { message, log } => {
                write!(f, "NVRTC compilation failed ({message})")?;
                if !log.trim().is_empty() {
                    write!(f, ":\n{}", log.trim_end())?;
                }
                Ok(())
            }
            NvrtcError::Api { call, message } => write!(f, "{call} failed: {message}"),
        }
    }
}

impl std::error::Error for NvrtcError {}

/// Where [`locate`] found the library and the headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// A file path, or a bare file name for the dynamic loader to search.
    pub library: PathBuf,
    pub include_dirs: Vec<PathBuf>,
}

/// Library files of the wheel and toolkit layouts under a CUDA folder, in
/// the order they are tried.
fn candidates_under(dir: &Path) -> Vec<PathBuf> {
    [
        "nvidia/cu13/lib/libnvrtc.so.13",
        "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
        "lib/libnvrtc.so.13",
        "lib64/libnvrtc.so",
        "lib/libnvrtc.so",
        "lib64/libnvrtc.so.13",
        "lib64/libnvrtc.so.12",
    ]
    .iter()
    .map(|p| dir.join(p))
    .collect()
}

/// The `include` folder beside a library's `lib`/`lib64` folder.
fn include_beside(library: &Path) -> Option<PathBuf> {
    let inc = library.parent()?.parent()?.join("include");
    inc.is_dir().then_some(inc)
}

/// Finds NVRTC as the module docs describe, from the process environment.
pub fn locate() -> Result<Location, NvrtcError> {
    locate_with(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
}

/// [`locate`] with the environment given as a lookup (for tests).
pub fn locate_with(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Location, NvrtcError> {
    let mut tried = Vec::new();
    let includes = |library: &Path| -> Vec<PathBuf> {
        match env("MOEC_CUDA_INCLUDE") {
            Some(dir) => vec![PathBuf::from(dir)],
            None => include_beside(library).into_iter().collect(),
        }
    };
    if let Some(lib) = env("MOEC_NVRTC_LIB") {
        let lib = PathBuf::from(lib);
        if lib.is_file() {
            let include_dirs = includes(&lib);
            return Ok(Location {
                library: lib,
                include_dirs,
            });
        }
        tried.push(format!("MOEC_NVRTC_LIB={}", lib.display()));
    }
    let mut homes = Vec::new();
    for var in ["MOEC_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env(var) {
            homes.push(PathBuf::from(dir));
        }
    }
    homes.push(PathBuf::from("/usr/local/cuda"));
    for home in homes {
        for lib in candidates_under(&home) {
            if lib.is_file() {
                let include_dirs = includes(&lib);
                return Ok(Location {
                    library: lib,
                    include_dirs,
                });
            }
            tried.push(lib.display().to_string());
        }
    }
    // The dynamic loader's search: only a load can tell.
    for name in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
        // SAFETY: opening NVRTC runs its initialisers, which only set up
        // the library's own state; the handle is dropped at once.
        if unsafe { Library::new(name) }.is_ok() {
            return Ok(Location {
                library: PathBuf::from(name),
                include_dirs: env("MOEC_CUDA_INCLUDE")
                    .map(PathBuf::from)
                    .into_iter()
                    .collect(),
            });
        }
        tried.push(name.to_string());
    }
    Err(NvrtcError::NotFound { tried })
}

// The C API (nvrtc.h). `nvrtcResult` is an `int` enum, `nvrtcProgram` a
// pointer to an opaque struct.
type Program = *mut c_void;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type CreateProgram = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type DestroyProgram = unsafe extern "C" fn(*mut Program) -> c_int;
type CompileProgram = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type GetSize = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type GetBytes = unsafe extern "C" fn(Program, *mut c_char) -> c_int;

/// Whether cubins of NVRTC `nvrtc` (major, minor) load on a driver of CUDA
/// `driver` (major, minor): the same major version or an older NVRTC (a
/// newer minor NVRTC is fine for cubins, under minor-version
/// compatibility). The error says what to do.
pub fn driver_compatible(nvrtc: (i32, i32), driver: (i32, i32)) -> Result<(), String> {
    if nvrtc.0 > driver.0 {
        return Err(format!(
            "NVRTC {}.{} is newer than the CUDA driver ({}.{}): its code needs a CUDA {} driver; point MOEC_NVRTC_LIB at an NVRTC {}.x (pip install 'nvidia-cuda-nvrtc-cu{}') or update the driver",
            nvrtc.0, nvrtc.1, driver.0, driver.1, nvrtc.0, driver.0, driver.0
        ));
    }
    Ok(())
}

/// CUDA's `major * 1000 + minor * 10` version number as (major, minor).
pub fn split_version(v: i32) -> (i32, i32) {
    (v / 1000, (v % 1000) / 10)
}

struct Api {
    get_error_string: GetErrorString,
    version: Version,
    create_program: CreateProgram,
    destroy_program: DestroyProgram,
    compile_program: CompileProgram,
    get_ptx_size: GetSize,
    get_ptx: GetBytes,
    /// Absent before CUDA 11.1: then only PTX.
    get_cubin_size: Option<GetSize>,
    get_cubin: Option<GetBytes>,
    get_log_size: GetSize,
    get_log: GetBytes,
}

/// A loaded NVRTC. `Send + Sync`: NVRTC's calls are thread-safe on distinct
/// programs, and every [`Nvrtc::compile`] uses its own.
pub struct Nvrtc {
    api: Api,
    location: Location,
    version: (i32, i32),
    // Field order is drop order: the library before the builtins it uses.
    _lib: Library,
    _builtins: Option<Library>,
}

impl fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nvrtc")
            .field("location", &self.location)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Compiled PTX, the cubin and NVRTC's log (warnings, usually empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ptx {
    /// The PTX text (without the terminating NUL).
    pub text: String,
    /// The cubin (an ELF image) for a real architecture (`sm_90`); empty
    /// for a virtual one (`compute_90`) or an NVRTC without
    /// `nvrtcGetCUBIN`.
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Checks `arch` is `sm_NN`/`compute_NN` with an optional `a` or `f`.
pub fn check_arch(arch: &str) -> Result<(), NvrtcError> {
    let digits = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .map(|r| r.strip_suffix(['a', 'f']).unwrap_or(r));
    match digits {
        Some(d) if (2..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(NvrtcError::BadArch(arch.to_string())),
    }
}

impl Nvrtc {
    /// Finds ([`locate`]) and loads NVRTC.
    pub fn load() -> Result<Nvrtc, NvrtcError> {
        Nvrtc::load_from(locate()?)
    }

    /// Loads NVRTC from `location`.
    pub fn load_from(location: Location) -> Result<Nvrtc, NvrtcError> {
        let path = location.library.display().to_string();
        let load_err = |message: String| NvrtcError::Load {
            path: path.clone(),
            message,
        };
        let builtins = match location.library.parent() {
            Some(dir) if location.library.is_file() => builtins_beside(dir)
                .map(|b| {
                    // SAFETY: NVRTC's builtins library has no initialisers
                    // with preconditions; it is kept loaded as long as NVRTC.
                    unsafe { Library::new(&b) }
                        .map_err(|e| load_err(format!("{}: {e}", b.display())))
                })
                .transpose()?,
            _ => None,
        };
        // SAFETY: loading NVRTC runs its initialisers, which set up only its
        // own state. The handle lives in the returned `Nvrtc` as long as the
        // function pointers taken from it.
        let lib =
            unsafe { Library::new(&location.library) }.map_err(|e| load_err(e.to_string()))?;
        fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
            // SAFETY: `T` is the function type nvrtc.h declares for `name`
            // (the type aliases above); the pointer is used only while `lib`
            // is loaded (`Nvrtc` owns both).
            unsafe { lib.get::<T>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| format!("missing {name}: {e}"))
        }
        let api = (|| -> Result<Api, String> {
            Ok(Api {
                get_error_string: sym(&lib, "nvrtcGetErrorString")?,
                version: sym(&lib, "nvrtcVersion")?,
                create_program: sym(&lib, "nvrtcCreateProgram")?,
                destroy_program: sym(&lib, "nvrtcDestroyProgram")?,
                compile_program: sym(&lib, "nvrtcCompileProgram")?,
                get_ptx_size: sym(&lib, "nvrtcGetPTXSize")?,
                get_ptx: sym(&lib, "nvrtcGetPTX")?,
                get_cubin_size: sym(&lib, "nvrtcGetCUBINSize").ok(),
                get_cubin: sym(&lib, "nvrtcGetCUBIN").ok(),
                get_log_size: sym(&lib, "nvrtcGetProgramLogSize")?,
                get_log: sym(&lib, "nvrtcGetProgramLog")?,
            })
        })()
        .map_err(load_err)?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both pointers are valid `int`s for the call.
        let r = unsafe { (api.version)(&mut major, &mut minor) };
        if r != 0 {
            return Err(load_err(format!("nvrtcVersion returned {r}")));
        }
        Ok(Nvrtc {
            api,
            location,
            version: (major, minor),
            _lib: lib,
            _builtins: builtins,
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// NVRTC's version, e.g. `(13, 0)`.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    fn error_string(&self, code: c_int) -> String {
        // SAFETY: nvrtcGetErrorString accepts any value and returns a static
        // NUL-terminated string (or NULL for an unknown code, handled here).
        let p = unsafe { (self.api.get_error_string)(code) };
        if p.is_null() {
            return format!("NVRTC error {code}");
        }
        // SAFETY: non-null, NUL-terminated and static (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Compiles `source` for `arch` (`sm_90`, `compute_90`, ...) with
    /// [`moec_kernels::cuda::NVRTC_OPTIONS`] and the include folders of the
    /// location plus `include_dirs`; `name` is the file name the log uses.
    pub fn compile(
        &self,
        source: &str,
        name: &str,
        arch: &str,
        include_dirs: &[PathBuf],
    ) -> Result<Ptx, NvrtcError> {
        check_arch(arch)?;
        let nul = |what: &str| NvrtcError::BadInput(format!("{what} holds a NUL byte"));
        let src = CString::new(source).map_err(|_| nul("the source"))?;
        let file = CString::new(name).map_err(|_| nul("the file name"))?;
        let mut options = vec![format!("--gpu-architecture={arch}")];
        options.extend(
            moec_kernels::cuda::NVRTC_OPTIONS
                .iter()
                .map(|o| o.to_string()),
        );
        for dir in self.location.include_dirs.iter().chain(include_dirs) {
            options.push(format!("--include-path={}", dir.display()));
        }
        let options = options
            .into_iter()
            .map(|o| CString::new(o).map_err(|_| nul("an include path")))
            .collect::<Result<Vec<_>, _>>()?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let count = c_int::try_from(option_ptrs.len())
            .map_err(|_| NvrtcError::BadInput("too many options".to_string()))?;

        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: `prog` is a valid out-pointer; `src` and `file` are
        // NUL-terminated and outlive the call; no headers are passed (count
        // 0 with null arrays, which the API allows).
        let r = unsafe {
            (self.api.create_program)(
                &mut prog,
                src.as_ptr(),
                file.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(NvrtcError::Api {
                call: "nvrtcCreateProgram",
                message: self.error_string(r),
            });
        }
        let guard = ProgramGuard { nvrtc: self, prog };
        // SAFETY: `prog` is the live program just created; `option_ptrs`
        // holds `count` NUL-terminated strings that outlive the call.
        let r = unsafe { (self.api.compile_program)(guard.prog, count, option_ptrs.as_ptr()) };
        let log = self.read(guard.prog, self.api.get_log_size, self.api.get_log, "log")?;
        if r != 0 {
            return Err(NvrtcError::Compile {
                message: self.error_string(r),
                log,
            });
        }
        let text = self.read(guard.prog, self.api.get_ptx_size, self.api.get_ptx, "PTX")?;
        let cubin = match (self.api.get_cubin_size, self.api.get_cubin) {
            (Some(size), Some(get)) => self.read_cubin(guard.prog, size, get)?,
            _ => Vec::new(),
        };
        Ok(Ptx { text, cubin, log })
    }

    /// The cubin of `prog` (empty when NVRTC made none: a virtual architecture).
    fn read_cubin(
        &self,
        prog: Program,
        size: GetSize,
        get: GetBytes,
    ) -> Result<Vec<u8>, NvrtcError> {
        self.read_bytes(prog, size, get, "nvrtcGetCUBIN")
    }

    /// Reads the log or the PTX of `prog` as text (NVRTC ends it with a NUL).
    fn read(
        &self,
        prog: Program,
        size: GetSize,
        get: GetBytes,
        what: &'static str,
    ) -> Result<String, NvrtcError> {
        let call = if what == "log" {
            "nvrtcGetProgramLog"
        } else {
            "nvrtcGetPTX"
        };
        let mut buf = self.read_bytes(prog, size, get, call)?;
        if let Some(end) = buf.iter().position(|&b| b == 0) {
            buf.truncate(end);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// One of `prog`'s outputs: a size call, then a copy (`call` names both
    /// in errors). Empty when NVRTC reports no bytes.
    fn read_bytes(
        &self,
        prog: Program,
        size: GetSize,
        get: GetBytes,
        call: &'static str,
    ) -> Result<Vec<u8>, NvrtcError> {
        let mut n = 0usize;
        // SAFETY: `prog` is live; `n` is a valid out-pointer.
        let r = unsafe { size(prog, &mut n) };
        if r != 0 {
            return Err(NvrtcError::Api {
                call,
                message: self.error_string(r),
            });
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n];
        // SAFETY: `buf` holds the `n` bytes NVRTC said it writes.
        let r = unsafe { get(prog, buf.as_mut_ptr().cast::<c_char>()) };
        if r != 0 {
            return Err(NvrtcError::Api {
                call,
                message: self.error_string(r),
            });
        }
        Ok(buf)
    }
}

/// Destroys an NVRTC program when dropped.
struct ProgramGuard<'a> {
    nvrtc: &'a Nvrtc,
    prog: Program,
}

impl Drop for ProgramGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: `prog` was created by nvrtcCreateProgram and is destroyed
        // exactly once, here; nothing uses it afterwards.
        unsafe { (self.nvrtc.api.destroy_program)(&mut self.prog) };
    }
}

/// `libnvrtc-builtins.so*` in `dir` (not the `.alt` variant), if any.
fn builtins_beside(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
        })
        .collect();
    found.sort();
    // The most specific name (`.so.13.0` over `.so`) is the one NVRTC asks for.
    found.pop()
}

/// The size in bytes of each `.entry` (kernel) of a PTX text, in order: from
/// the `.entry` line to its closing brace.
pub fn entry_sizes(ptx: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(String, usize)> = None;
    let mut offset = 0;
    for line in ptx.split_inclusive('\n') {
        let t = line.trim_start();
        if current.is_none() {
            let entry = t
                .strip_prefix(".visible ")
                .or_else(|| t.strip_prefix(".weak "))
                .unwrap_or(t)
                .strip_prefix(".entry ");
            if let Some(rest) = entry {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
                    .collect();
                current = Some((name, offset));
            }
        } else if line.trim_end() == "}" {
            if let Some((name, start)) = current.take() {
                out.push((name, offset + line.len() - start));
            }
        }
        offset += line.len();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::OsString;

    #[test]
    fn a_loaded_nvrtc_is_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Nvrtc>();
        send_sync::<super::super::PtxCache>();
    }

    #[test]
    fn architectures() {
        for ok in ["sm_90", "sm_90a", "compute_90", "sm_100f", "sm_120"] {
            assert_eq!(check_arch(ok), Ok(()), "{ok}");
        }
        for bad in ["sm90", "sm_", "sm_9", "sm_9000", "gfx90a", "sm_90;rm", ""] {
            assert!(check_arch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn not_found_is_an_error_with_the_places_tried() {
        let dir = std::env::temp_dir().join(format!("moec-no-cuda-{}", std::process::id()));
        let env: BTreeMap<&str, OsString> = [
            (
                "MOEC_NVRTC_LIB",
                dir.join("libnvrtc.so.13").into_os_string(),
            ),
            ("MOEC_CUDA_HOME", dir.clone().into_os_string()),
        ]
        .into_iter()
        .collect();
        match locate_with(|k| env.get(k).cloned()) {
            // A machine with NVRTC installed system-wide finds it anyway.
            Ok(loc) => assert!(!loc.library.starts_with(&dir)),
            Err(e) => {
                assert_eq!(e.to_string(), NOT_FOUND);
                let NvrtcError::NotFound { tried } = e else {
                    panic!("{e:?}")
                };
                assert!(tried[0].starts_with("MOEC_NVRTC_LIB="));
                assert!(tried
                    .iter()
                    .any(|t| t.ends_with("nvidia/cu13/lib/libnvrtc.so.13")));
            }
        }
    }

    #[test]
    fn the_wheel_layout_is_found() {
        let dir = std::env::temp_dir().join(format!("moec-fake-wheel-{}", std::process::id()));
        let lib = dir.join("nvidia/cu13/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(dir.join("nvidia/cu13/include")).unwrap();
        std::fs::write(lib.join("libnvrtc.so.13"), b"").unwrap();
        let env: BTreeMap<&str, OsString> = [("MOEC_CUDA_HOME", dir.clone().into_os_string())]
            .into_iter()
            .collect();
        let loc = locate_with(|k| env.get(k).cloned()).unwrap();
        assert_eq!(loc.library, lib.join("libnvrtc.so.13"));
        assert_eq!(loc.include_dirs, vec![dir.join("nvidia/cu13/include")]);
        // Not a library: loading fails with a message, not a panic.
        let e = Nvrtc::load_from(loc).unwrap_err();
        assert!(matches!(e, NvrtcError::Load { .. }), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nvrtc_newer_than_the_driver_is_refused_only_across_majors() {
        assert_eq!(split_version(13000), (13, 0));
        assert_eq!(split_version(12040), (12, 4));
        // pip's NVRTC 13.2 with a 13.0 driver: cubins load.
        assert_eq!(driver_compatible((13, 2), (13, 0)), Ok(()));
        assert_eq!(driver_compatible((12, 8), (13, 0)), Ok(()));
        let e = driver_compatible((13, 0), (12, 4)).unwrap_err();
        assert!(
            e.contains("NVRTC 13.0 is newer than the CUDA driver (12.4)"),
            "{e}"
        );
        assert!(e.contains("MOEC_NVRTC_LIB"), "{e}");
    }

    #[test]
    fn ptx_entries_are_measured() {
        let ptx = "//\n.version 9.0\n.target sm_90\n\n\t// .globl\tmoec_a_1\n.visible .entry moec_a_1(\n\t.param .u64 p\n)\n{\n\tret;\n}\n\n.visible .entry moec_b_2()\n{\n}\n";
        let sizes = entry_sizes(ptx);
        assert_eq!(
            sizes,
            vec![
                (
                    "moec_a_1".to_string(),
                    ".visible .entry moec_a_1(\n\t.param .u64 p\n)\n{\n\tret;\n}\n".len()
                ),
                (
                    "moec_b_2".to_string(),
                    ".visible .entry moec_b_2()\n{\n}\n".len()
                ),
            ]
        );
    }
}
