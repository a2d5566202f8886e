//! Compiled PTX, cached per plan.
//!
//! The key is the module's content hash ([`Module::hash`], which covers the
//! generated source and, through its header, the NVRTC options), the target
//! architecture and NVRTC's version: `<hash>-<arch>-nvrtc<major>.<minor>`.
//! Two plans with the same kernels share an entry. Entries live in memory
//! for the life of the cache and, when the cache has a folder
//! (`MOEC_PTX_CACHE` for [`PtxCache::from_env`]), in `<folder>/<key>.ptx`
//! across runs; an unreadable or unwritable file only costs a compilation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

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

    /// The cache key of `module` compiled for `arch` by NVRTC `version`.
    pub fn key(module: &Module, arch: &str, version: (i32, i32)) -> String {
        format!("{}-{arch}-nvrtc{}.{}", module.hash(), version.0, version.1)
    }

    /// The PTX of a hand-written translation unit (`name`, `source`) for
    /// `arch`, cached like a module under
    /// `<name>-<fnv64 of source>-<arch>-nvrtc<major>.<minor>`.
    pub fn get_or_compile_source(
        &self,
        nvrtc: &Nvrtc,
        name: &str,
        source: &str,
        arch: &str,
    ) -> Result<(Arc<Ptx>, Source), NvrtcError> {
        super::nvrtc::check_arch(arch)?;
        let (major, minor) = nvrtc.version();
        let key = format!(
            "{name}-{:016x}-{arch}-nvrtc{major}.{minor}",
            super::rdzv::fnv64(source.as_bytes())
        );
        if let Some(p) = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned()
        {
            return Ok((p, Source::Memory));
        }
        let ptx = Arc::new(nvrtc.compile(source, &format!("{name}.cu"), arch, &[])?);
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Arc::clone(&ptx));
        Ok((ptx, Source::Compiled))
    }

    /// The PTX of `module` for `arch`, compiled by `nvrtc` unless cached.
    pub fn get_or_compile(
        &self,
        nvrtc: &Nvrtc,
        module: &Module,
        arch: &str,
    ) -> Result<(Arc<Ptx>, Source), NvrtcError> {
        super::nvrtc::check_arch(arch)?;
        let key = PtxCache::key(module, arch, nvrtc.version());
        let memory = |m: &Mutex<BTreeMap<String, Arc<Ptx>>>| {
            m.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key)
                .cloned()
        };
        if let Some(p) = memory(&self.memory) {
            return Ok((p, Source::Memory));
        }
        let file = self.dir.as_ref().map(|d| d.join(format!("{key}.ptx")));
        let (ptx, source) = match file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            Some(text) => (
                Ptx {
                    text,
                    log: String::new(),
                },
                Source::Disk,
            ),
            None => {
                let name = format!("{}.cu", module.hash());
                let ptx = nvrtc.compile(&module.source(), &name, arch, &[])?;
                if let (Some(dir), Some(file)) = (&self.dir, &file) {
                    // Written whole, then renamed, so a reader never sees
                    // half a file; failures leave the cache without it.
                    let tmp = dir.join(format!("{key}.ptx.{}.tmp", std::process::id()));
                    let written = std::fs::create_dir_all(dir)
                        .and_then(|()| std::fs::write(&tmp, &ptx.text))
                        .and_then(|()| std::fs::rename(&tmp, file));
                    if written.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                }
                (ptx, Source::Compiled)
            }
        };
        let ptx = Arc::new(ptx);
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Arc::clone(&ptx));
        Ok((ptx, source))
    }
}
