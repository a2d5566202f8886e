//! Compiled code (PTX and cubin), cached per plan.
//!
//! The key is the module's content hash ([`Module::hash`], which covers the
//! generated source and, through its header, the NVRTC options), the target
//! architecture and NVRTC's version: `<hash>-<arch>-nvrtc<major>.<minor>`
//! (a cubin is for one architecture and comes from one NVRTC). Two plans
//! with the same kernels share an entry. Entries live in memory for the
//! life of the cache and, when the cache has a folder (`MOEC_PTX_CACHE` for
//! [`PtxCache::from_env`]), in `<folder>/<key>.ptx` and `<key>.cubin` across
//! runs; an unreadable or unwritable file only costs a compilation.
//!
//! [`PtxCache::global`] is the process's cache, which every
//! [`CudaBackend`](super::CudaBackend) uses: a second backend in the same
//! process (another plan, or the same one again) compiles nothing it has
//! compiled before, the native assignment kernels included (keyed by a hash
//! of their source, the architecture and NVRTC's version).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use moec_kernels::cuda::Module;

use super::nvrtc::{Nvrtc, NvrtcError, Ptx};

/// Where [`PtxCache::get_or_compile`] found the PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Memory,
    Disk,
    Compiled,
}

#[derive(Debug, Default)]
pub struct PtxCache {
    dir: Option<PathBuf>,
    memory: Mutex<BTreeMap<String, Arc<Ptx>>>,
}

impl PtxCache {
    /// A cache in memory, and in `dir` when given.
    pub fn new(dir: Option<PathBuf>) -> PtxCache {
        PtxCache {
            dir,
            memory: Mutex::new(BTreeMap::new()),
        }
    }

    /// A cache in memory, and in the folder `MOEC_PTX_CACHE` names, if set.
    pub fn from_env() -> PtxCache {
        PtxCache::new(
            std::env::var_os("MOEC_PTX_CACHE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        )
    }

    /// The process's cache ([`PtxCache::from_env`] on first use).
    pub fn global() -> &'static PtxCache {
        static GLOBAL: OnceLock<PtxCache> = OnceLock::new();
        GLOBAL.get_or_init(PtxCache::from_env)
    }

    /// The cache key of a hand-written translation unit `name` with
    /// `source`, compiled for `arch` by NVRTC `version`.
    pub fn source_key(name: &str, source: &str, arch: &str, version: (i32, i32)) -> String {
        format!(
            "{name}-{:016x}-{arch}-nvrtc{}.{}",
            super::rdzv::fnv64(source.as_bytes()),
            version.0,
            version.1
        )
    }

    /// The cache key of `module` compiled for `arch` by NVRTC `version`.
    pub fn key(module: &Module, arch: &str, version: (i32, i32)) -> String {
        format!("{}-{arch}-nvrtc{}.{}", module.hash(), version.0, version.1)
    }

    /// The code of a hand-written translation unit (`name`, `source`) for
    /// `arch`, cached like a module under [`PtxCache::source_key`].
    pub fn get_or_compile_source(
        &self,
        nvrtc: &Nvrtc,
        name: &str,
        source: &str,
        arch: &str,
    ) -> Result<(Arc<Ptx>, Source), NvrtcError> {
        super::nvrtc::check_arch(arch)?;
        let key = PtxCache::source_key(name, source, arch, nvrtc.version());
        self.get_or_compile_with(&key, arch, || {
            nvrtc.compile(source, &format!("{name}.cu"), arch, &[])
        })
    }

    /// The code of `module` for `arch`, compiled by `nvrtc` unless cached.
    pub fn get_or_compile(
        &self,
        nvrtc: &Nvrtc,
        module: &Module,
        arch: &str,
    ) -> Result<(Arc<Ptx>, Source), NvrtcError> {
        super::nvrtc::check_arch(arch)?;
        let key = PtxCache::key(module, arch, nvrtc.version());
        self.get_or_compile_with(&key, arch, || {
            let name = format!("{}.cu", module.hash());
            nvrtc.compile(&module.source(), &name, arch, &[])
        })
    }

    /// The entry `key` (code for `arch`): from memory, else from the
    /// folder, else from `compile`, kept in memory and written to the
    /// folder.
    pub fn get_or_compile_with(
        &self,
        key: &str,
        arch: &str,
        compile: impl FnOnce() -> Result<Ptx, NvrtcError>,
    ) -> Result<(Arc<Ptx>, Source), NvrtcError> {
        if let Some(p) = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
        {
            return Ok((p, Source::Memory));
        }
        let on_disk = self.dir.as_ref().and_then(|d| read_entry(d, key, arch));
        let (ptx, source) = match on_disk {
            Some(ptx) => (ptx, Source::Disk),
            None => {
                let ptx = compile()?;
                if let Some(dir) = &self.dir {
                    write_entry(dir, key, &ptx);
                }
                (ptx, Source::Compiled)
            }
        };
        let ptx = Arc::new(ptx);
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_string(), Arc::clone(&ptx));
        Ok((ptx, source))
    }
}

/// Whether NVRTC makes a cubin for `arch` (a real architecture, `sm_*`).
fn has_cubin(arch: &str) -> bool {
    arch.starts_with("sm_")
}

/// The entry `key` from `dir`: the PTX, and the cubin where `arch` has one.
fn read_entry(dir: &std::path::Path, key: &str, arch: &str) -> Option<Ptx> {
    let text = std::fs::read_to_string(dir.join(format!("{key}.ptx"))).ok()?;
    let cubin = if has_cubin(arch) {
        std::fs::read(dir.join(format!("{key}.cubin")))
            .ok()
            .filter(|c| !c.is_empty())?
    } else {
        Vec::new()
    };
    Some(Ptx {
        text,
        cubin,
        log: String::new(),
    })
}

/// Writes the entry `key` to `dir`, each file whole and then renamed (the
/// cubin first, so that a reader who finds the PTX finds the cubin), so a
/// reader never sees half a file; failures leave the cache without it.
fn write_entry(dir: &std::path::Path, key: &str, ptx: &Ptx) {
    let put = |ext: &str, bytes: &[u8]| {
        let file = dir.join(format!("{key}.{ext}"));
        let tmp = dir.join(format!("{key}.{ext}.{}.tmp", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, file));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.is_ok()
    };
    if ptx.cubin.is_empty() || put("cubin", &ptx.cubin) {
        put("ptx", ptx.text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> Result<Ptx, NvrtcError> {
        Ok(Ptx {
            text: text.to_string(),
            cubin: b"\x7fELF".to_vec(),
            log: String::new(),
        })
    }

    /// Every backend of a process shares one cache: the native kernels
    /// compile once per architecture and NVRTC version.
    #[test]
    fn the_process_compiles_the_native_kernels_once() {
        let cache = PtxCache::global();
        assert!(std::ptr::eq(cache, PtxCache::global()));
        let source = "extern \"C\" __global__ void k() {} // cache test";
        let key = PtxCache::source_key("moec_test", source, "sm_90", (13, 0));
        assert!(key.starts_with("moec_test-") && key.ends_with("-sm_90-nvrtc13.0"));
        let mut compiled = 0;
        for _ in 0..3 {
            let (p, _) = cache
                .get_or_compile_with(&key, "sm_90", || {
                    compiled += 1;
                    code("ptx")
                })
                .unwrap();
            assert_eq!(p.text, "ptx");
        }
        assert_eq!(compiled, 1);
        // Another architecture or NVRTC is another entry.
        for other in [
            PtxCache::source_key("moec_test", source, "sm_100", (13, 0)),
            PtxCache::source_key("moec_test", source, "sm_90", (13, 2)),
            PtxCache::source_key("moec_test", "// other", "sm_90", (13, 0)),
        ] {
            assert_ne!(other, key);
        }
        // A failed compilation is not cached.
        let key2 = PtxCache::source_key("moec_test", "// fails", "sm_90", (13, 0));
        let failed =
            cache.get_or_compile_with(&key2, "sm_90", || Err(NvrtcError::BadInput("test".into())));
        assert!(failed.is_err());
        let (_, again) = cache
            .get_or_compile_with(&key2, "sm_90", || code("x"))
            .unwrap();
        assert_eq!(again, Source::Compiled);
    }
}
